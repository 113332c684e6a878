from srde_core.testing import assert_exact
from srde_example_plugin.delta import FullDelta, FullParams


def test_full_delta_matches_the_dense_reference():
    assert_exact(FullDelta(FullParams(scale=0.5)))
