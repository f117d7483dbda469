"""PostgreSQL knowledge: WAL file names and LSN arithmetic, the server connection, the data directory."""
