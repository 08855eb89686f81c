"""Continuous batching with chunked prefill, priorities and preemption by recompute."""

from gllm.scheduler.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from gllm.scheduler.sequence import Sequence, SequenceStatus

__all__ = ["ScheduledSeq", "Scheduler", "SchedulerConfig", "SchedulerOutput", "Sequence", "SequenceStatus"]
