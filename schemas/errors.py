"""Error codes carried by ``error`` answers. Stable: clients switch on them."""

from enum import Enum


class ErrorCode(str, Enum):
    BAD_REQUEST = "bad_request"          # the body is not a valid request (details in the message)
    PROMPT_TOO_LONG = "prompt_too_long"  # the prompt fills the context: no room for one token
    #                                      (a max_new_tokens past the context is clamped, see Done)
    UNKNOWN_DP_RANK = "unknown_dp_rank"  # dp_rank names no group of this deployment
    OVERLOADED = "overloaded"            # queues are full; retry later
    UNAVAILABLE = "unavailable"          # no group can take the request right now
    WORKER_LOST = "worker_lost"          # a worker of the group stopped answering mid-request
    PUBLISHER_LOST = "publisher_lost"    # the group's publisher died or restarted mid-request
    DIVERGED = "diverged"                # workers of a group disagreed, or a step was missed
    TIMEOUT = "timeout"                  # an internal deadline passed
    INTERNAL = "internal"                # a bug: please report it with the rid
