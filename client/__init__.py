"""Client library for a PBFT cluster (see ``client.client``)."""

from client.client import BlockingClient, Client, QuorumTimeout

__all__ = ["BlockingClient", "Client", "QuorumTimeout"]
