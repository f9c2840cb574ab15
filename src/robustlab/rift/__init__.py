"""RiFT: robust critical fine-tuning (Zhu et al., ICCV 2023) of any robust robustlab checkpoint.

1. `compute_mrc`: module robust criticality of every Conv/Linear module, on a fixed adversarial set.
2. `finetune`: clean-data fine-tuning of one module, everything else frozen.
3. `interpolate` / `AlphaSearch`: θ(α) between the robust and fine-tuned weights, α chosen on validation data
   (`recalibrate_bn`: θ(α)'s BatchNorm statistics re-estimated on adversarial training images).
`rift` runs all three (optionally over several modules and learning rates) and reports before/after on the
test set; `robustlab rift RUN --out OUT` and `robustlab mrc RUN` are its commands. See docs/rift.md.
"""
from robustlab.rift.finetune import ALPHAS, AlphaSearch, CriticalFinetune, finetune, interpolate, recalibrate_bn
from robustlab.rift.mrc import MRCConfig, compute_mrc, module_criticality, ranked
from robustlab.rift.pipeline import RiftSettings, TestSettings, rift

__all__ = ["ALPHAS", "AlphaSearch", "CriticalFinetune", "MRCConfig", "RiftSettings", "TestSettings", "compute_mrc",
           "finetune", "interpolate", "module_criticality", "ranked", "recalibrate_bn", "rift"]
