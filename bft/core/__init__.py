"""The PBFT protocol as pure state machines: no sockets, no asyncio, no clock reads, no
randomness, no disk. Inputs are messages and ``now`` (milliseconds, passed in); outputs are the
messages to send, collected in an outbox the driver drains."""
