"""Third-party notices that say nothing a user can act on, silenced before anything imports their source."""

import logging

# peft imports bitsandbytes, which logs on CPUs with AVX-512 bf16 that an optional kernel package is missing and falls
# back on its own code.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)
