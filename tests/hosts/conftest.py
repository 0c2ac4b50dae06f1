"""The multi-host test needs root (network namespaces) and iproute2's `ip netns`."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "netns: hosts in network namespaces (root and `ip netns` needed, else skipped)"
    )
