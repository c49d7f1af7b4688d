"""The `<clientstorage>` configuration section (ZConfig).

Loaded with ``%import zeo``, it opens our ClientStorage the way ZODB's
own storage sections open theirs::

    %import zeo
    <clientstorage>
      server 127.0.0.1:8100
    </clientstorage>

ZODB's `<zeoclient>` section always opens the real ZEO package, hence a
section name of our own (DESIGN.md).
"""

import ZConfig
from ZODB.config import BaseConfig


class ClientStorageConfig(BaseConfig):
    """Factory for a configured ClientStorage: `open()` connects."""

    def __init__(self, config):
        BaseConfig.__init__(self, config)
        if config.read_only and config.read_only_fallback:
            raise ZConfig.ConfigurationError(
                "clientstorage: read-only and read-only-fallback cannot "
                "both be on (read-only-fallback means: writable if the "
                "server allows it)")
        if config.min_disconnect_poll > config.max_disconnect_poll:
            raise ZConfig.ConfigurationError(
                "clientstorage: min-disconnect-poll (%s) is larger than "
                "max-disconnect-poll (%s)" % (config.min_disconnect_poll,
                                              config.max_disconnect_poll))
        if config.heartbeat_timeout < 0:
            raise ZConfig.ConfigurationError(
                "clientstorage: heartbeat-timeout cannot be negative")
        if config.busy_poll < 0:
            raise ZConfig.ConfigurationError(
                "clientstorage: busy-poll cannot be negative")
        #: A `zeo.tls.ClientTLS` from the <ssl> section, made now so that
        #: a bad file fails the configuration, not the first connection.
        self.tls = None
        if config.ssl is not None:
            from zeo.tls import ClientTLS, TLSConfigError
            try:
                self.tls = ClientTLS.from_config(config.ssl)
            except TLSConfigError as error:
                raise ZConfig.ConfigurationError(
                    "clientstorage: %s" % error) from None
        if not 0 <= config.blob_cache_size_check < 100:
            raise ZConfig.ConfigurationError(
                "clientstorage: blob-cache-size-check is a percentage "
                "from 0 to 99, not %s" % config.blob_cache_size_check)

    def open(self):
        from zeo.ClientStorage import ClientStorage
        config = self.config
        return ClientStorage(
            [server.address for server in config.server],
            storage=config.storage,
            cache_size=config.cache_size,
            name=config.name or '',
            client=config.client,
            var=config.var,
            min_disconnect_poll=config.min_disconnect_poll,
            max_disconnect_poll=config.max_disconnect_poll,
            wait=config.wait,
            wait_timeout=config.wait_timeout,
            read_only=config.read_only,
            read_only_fallback=config.read_only_fallback,
            blob_dir=config.blob_dir,
            shared_blob_dir=config.shared_blob_dir,
            blob_cache_size=config.blob_cache_size,
            blob_cache_size_check=config.blob_cache_size_check,
            server_sync=config.server_sync,
            client_label=config.client_label,
            drop_cache_rather_verify=config.drop_cache_rather_verify,
            cache_trace=config.cache_trace,
            busy_poll=config.busy_poll,
            heartbeat_timeout=config.heartbeat_timeout,
            ssl=self.tls and self.tls.context,
            ssl_server_hostname=self.tls and self.tls.server_hostname,
        )
