"""Names of the composer's environment variables (a light module: the CLI imports it at start-up)."""

#: Environment variable holding the caller's token (its sha256 is in the pools file).
TOKEN_ENV = "RX_COMPOSE_TOKEN"
#: Environment variables naming the default database and pools file.
DB_ENV = "RX_COMPOSE_DB"
POOLS_ENV = "RX_COMPOSE_POOLS"
