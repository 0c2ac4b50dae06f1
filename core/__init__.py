"""TalkMosaic's domain: images, mosaics, the car library, the gallery, the job worker and Q&A.

Nothing here imports a chat SDK; `core.vlm` imports nothing from the rest of the project.
"""
