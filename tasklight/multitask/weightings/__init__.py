"""Loss-weighting methods, one file each, all registered in :mod:`tasklight.multitask.registry`.

The methods of :mod:`tasklight.multitask.weighting` are registered here too, so that
``tasklight.weightings()`` lists every method with its paper, reference implementation and parity test.
"""
from tasklight.multitask.registry import register_weighting
from tasklight.multitask import weighting as _w
from tasklight.multitask.weightings.aligned_mtl import AlignedMTL
from tasklight.multitask.weightings.conflict_free import ConFIG
from tasklight.multitask.weightings.db_mtl import DBMTL
from tasklight.multitask.weightings.dualproj import DualProj
from tasklight.multitask.weightings.excess_mtl import ExcessMTL
from tasklight.multitask.weightings.fairgrad import FairGrad
from tasklight.multitask.weightings.gls import GLS
from tasklight.multitask.weightings.graddrop import GradDrop
from tasklight.multitask.weightings.gradvac import GradVac
from tasklight.multitask.weightings.moco import MoCo
from tasklight.multitask.weightings.modo import MoDo
from tasklight.multitask.weightings.sdmgrad import SDMGrad
from tasklight.multitask.weightings.stch import STCH
from tasklight.multitask.weightings.torchjd_adapter import TorchJD

_LIBMTL = "tests/multitask/test_libmtl_parity.py"
_W = "tests/multitask/test_weighting.py"
_JD = "tests/multitask/test_torchjd_parity.py"
for _name, _cls, _paper, _ref, _test in [
    ("static", _w.StaticWeighting, "linear scalarisation", "torchjd `Constant`",
     f"{_JD}::test_the_earlier_methods_that_torchjd_also_has"),
    ("equal", _w.EqualWeighting, "linear scalarisation, all weights 1", "LibMTL 1.1.5 `EW`; torchjd `Sum`",
     f"{_LIBMTL}::test_equal_and_uncertainty_weighting"),
    ("uncertainty", _w.UncertaintyWeighting, "Kendall, Gal & Cipolla (2018)", "LibMTL 1.1.5 `UW`",
     f"{_LIBMTL}::test_equal_and_uncertainty_weighting"),
    ("dwa", _w.DWA, "Liu, Johns & Davison (2019), MTAN", "LibMTL 1.1.5 `DWA`",
     f"{_LIBMTL}::test_dwa_from_the_same_epoch_means"),
    ("dro", _w.DROWeighting, "Sagawa et al. (2020), group DRO", "the exponentiated-gradient update written out",
     f"{_W}::test_dro_weights_are_exponentiated_gradient_on_the_simplex"),
    ("gradnorm", _w.GradNorm, "Chen et al. (2018), GradNorm", "LibMTL 1.1.5 `GradNorm`",
     f"{_LIBMTL}::test_gradnorm_weights_update_direction"),
    ("mgda", _w.MGDA, "Sener & Koltun (2018), MGDA-UB", "LibMTL 1.1.5 `MGDA`; torchjd `MGDA`", f"{_LIBMTL}::test_mgda"),
    ("pcgrad", _w.PCGrad, "Yu et al. (2020), PCGrad", "LibMTL 1.1.5 `PCGrad`; torchjd `PCGrad`",
     f"{_LIBMTL}::test_pcgrad_with_the_same_visiting_orders"),
    ("rlw", _w.RLW, "Lin et al. (2022), random loss weighting", "LibMTL 1.1.5 `RLW`; torchjd `Random`",
     f"{_LIBMTL}::test_rlw_from_the_same_normal_draws"),
    ("famo", _w.FAMO, "Liu et al. (2023), FAMO", "autograd and torch.optim.Adam",
     f"{_W}::test_famo_weights_and_logit_updates_against_autograd_and_torch_adam"),
    ("cagrad", _w.CAGrad, "Liu et al. (2021), CAGrad", "LibMTL 1.1.5 `CAGrad`; torchjd `CAGrad`",
     f"{_LIBMTL}::test_cagrad"),
    ("nashmtl", _w.NashMTL, "Navon et al. (2022), Nash-MTL", "torchjd `NashMTL` (the paper's cvxpy iterations)",
     f"{_JD}::test_nash_mtl_and_cagrad_against_torchjd"),
    ("imtl", _w.IMTL, "Liu et al. (2021), IMTL", "LibMTL 1.1.5 `IMTL`; torchjd `IMTLG`",
     f"{_LIBMTL}::test_imtl_hybrid"),
    ("upgrad", _w.UPGrad, "Quinton & Rey (2024), Jacobian Descent", "torchjd `UPGrad`",
     f"{_W}::test_upgrad_never_conflicts_and_matches_torchjd_on_the_jacobian"),
]:
    register_weighting(_name, paper=_paper, reference=_ref, parity=_test)(_cls)

__all__ = ["AlignedMTL", "ConFIG", "DBMTL", "DualProj", "ExcessMTL", "FairGrad", "GLS", "GradDrop", "GradVac",
           "MoCo", "MoDo", "SDMGrad", "STCH", "TorchJD"]
