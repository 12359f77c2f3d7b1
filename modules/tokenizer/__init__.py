from modules.tokenizer.tokenizer import *  # noqa: F401,F403
