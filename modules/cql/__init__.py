from modules.cql.cql import *  # noqa: F401,F403
