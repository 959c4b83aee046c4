"""normbench's config schema in Hydra's ConfigStore, wherever Hydra composes.

Hydra imports every module of the ``hydra_plugins`` package when it starts (its plugin
scan), in every process that composes a config: the command's, a joblib worker's, a
cluster job's. Importing this one stores :mod:`normbench.schema` (``base_config`` and the
group options' schemas) before ``normbench/conf/config.yaml``, which names them, is read.
"""

from normbench.schema import register

register()
