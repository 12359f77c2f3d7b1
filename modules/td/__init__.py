from modules.td.td import *  # noqa: F401,F403
