"""The comparison protocol, independent of any world: equal budgets per compared row
(training samples, UNet forward-equivalents, seconds, LoRA rank), the run graph, the
statistics (Frechet distance, KID, bootstraps that resample reference sets by source
cluster, Holm's correction) and the ``World`` interface a world (digits, scenes)
implements to be run by ``python -m hypersd_core.protocol --world NAME``.
"""
