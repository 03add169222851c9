"""Code shared by the server and the client; imports neither side."""
