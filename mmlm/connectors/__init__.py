"""Connectors: one file each, registered by exact name in ``mmlm.registry.CONNECTORS``."""

from mmlm.connectors._base import Connector, ConnectorOptions, build_connector

__all__ = ["Connector", "ConnectorOptions", "build_connector"]
