"""An HTTP client that behaves as a browser on a gallery page: it keeps the session cookie the
page sets and sends the page's Origin with every request, as fetch() from the page does."""

from contextlib import asynccontextmanager

import aiohttp


@asynccontextmanager
async def gallery_browser(base: str, page: str = "/", origin: str | None = None):
    # unsafe=True: aiohttp's jar refuses cookies from a bare IP host such as 127.0.0.1.
    jar = aiohttp.CookieJar(unsafe=True)
    headers = {"Origin": origin or base}
    async with aiohttp.ClientSession(cookie_jar=jar, headers=headers) as http:
        async with http.get(base + page) as response:
            assert response.status == 200, await response.text()
        yield http
