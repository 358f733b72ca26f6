"""The pure DNS core: packets and TCP reassembly, wire reading, what a reply teaches, and
which resolvers are trusted. Imports nothing from ``ramfw.kernel``."""
