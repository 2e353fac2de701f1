"""Analytic planner and ring simulator: what fits, how long it takes, where the ring stalls.

``hardware`` describes devices and links, ``cost`` the paper's block-size rule and
per-device memory, ``step`` the predicted step time, ``simulate`` a discrete-event model of
one ring attention layer, ``fit`` the models fitted to measured rates (``bench calibrate``,
``bench memory``), ``cli`` the ``ringattn plan`` and ``ringattn simulate`` commands.
The public names of each are re-exported here (their ``__all__``).
"""

from ringattn.plan import cost as _cost
from ringattn.plan import fit as _fit
from ringattn.plan import hardware as _hardware
from ringattn.plan import simulate as _simulate
from ringattn.plan import step as _step
from ringattn.plan.cost import *  # noqa: F403
from ringattn.plan.fit import *  # noqa: F403
from ringattn.plan.hardware import *  # noqa: F403
from ringattn.plan.simulate import *  # noqa: F403
from ringattn.plan.step import *  # noqa: F403

__all__ = [*_cost.__all__, *_fit.__all__, *_hardware.__all__, *_simulate.__all__, *_step.__all__]
