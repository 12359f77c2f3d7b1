from modules.qlora.qlora import *  # noqa: F401,F403
