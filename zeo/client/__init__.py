"""The client side of zeo: connection layer and object cache.

The public entry point is `zeo.ClientStorage.ClientStorage`.
"""
