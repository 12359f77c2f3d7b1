from modules.inference.config import *  # noqa: F401,F403
from modules.inference.paged import *  # noqa: F401,F403
from modules.inference.scheduler import *  # noqa: F401,F403
from modules.inference.speculative import *  # noqa: F401,F403
from modules.inference.speedup import *  # noqa: F401,F403
from modules.inference.quantize import *  # noqa: F401,F403
