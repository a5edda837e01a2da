"""The fingerprint lab server: a FastAPI application that queues and runs volume fits.

The server calls the library (:mod:`fingerprint`); the library never imports it.

>>> from server.app import create_app
>>> from server.config import Settings
>>> app = create_app(Settings(data_dir="/srv/fingerprint"))
"""

__all__ = ["API_PREFIX"]

#: Prefix of every authenticated route.
API_PREFIX = "/v1"
