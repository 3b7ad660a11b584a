"""CASD atomic broadcast (Cristian, Aghili, Strong, Dolev): the synchronous protocol set against
PBFT in the simulator (``bft.sim.casd``). See ``bft.casd.protocol``."""
