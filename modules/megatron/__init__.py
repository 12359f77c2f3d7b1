from modules.megatron.megatron import *  # noqa: F401,F403
from modules.megatron.megatron import (bubble_fraction, column_parallel_linear, gpipe_schedule,  # noqa: F401
                                       one_f_one_b_schedule, row_parallel_linear, zero_memory_per_rank)
