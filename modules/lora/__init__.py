from modules.lora.lora import *  # noqa: F401,F403
