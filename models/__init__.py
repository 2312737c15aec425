"""Score networks and their registry. Importing the package registers every network."""
