"""The report's accuracy advice: options to try when the calibration AUROC is low, from what was measured."""

from lineguard.trainer.advice import ADVICE_BELOW_AUROC, BY_DEFECT_TYPE, advice

PATCHCORE = {"backbone": "efficientnet-lite0", "input_height": 256, "regions": 1}


def test_a_high_or_unknown_calibration_auroc_gets_no_advice():
    assert advice("patchcore", PATCHCORE, ADVICE_BELOW_AUROC) == []
    assert advice("patchcore", PATCHCORE, None) == []


def test_a_low_auroc_names_the_value_and_the_options_size_backbone_and_position():
    head, *options = advice("patchcore", PATCHCORE, 0.915)
    assert "0.915" in head and str(ADVICE_BELOW_AUROC) in head
    text = "\n".join(options)
    assert "--regions 2" in text and "--backbone efficientnet-lite1" in text and "--image-size 320" in text
    assert "--bank-size 16384" in text
    assert "--model patchcore" not in text  # already PatchCore
    assert options[-1] == BY_DEFECT_TYPE and "Defects by type" in BY_DEFECT_TYPE


def test_options_already_in_use_are_not_suggested_again():
    config = {"backbone": "efficientnet-lite2", "input_height": 320, "regions": 2, "max_bank_size": 16384}
    _, *options = advice("patchcore", config, 0.9)
    assert options == [BY_DEFECT_TYPE]  # where to look first, whatever the model
    _, *fastflow = advice("fastflow", {"backbone": "efficientnet-lite0", "input_height": 256}, 0.9)
    assert any("--model patchcore" in o for o in fastflow) and not any("--regions" in o for o in fastflow)
