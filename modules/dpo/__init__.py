from modules.dpo.dpo import *  # noqa: F401,F403
