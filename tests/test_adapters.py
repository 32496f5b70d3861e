"""Adapters and rollout plumbing on tiny models of each family: batches, labels, masks, generation."""

import pytest
import torch
from PIL import Image

from sc_tune.adapters import supported_model_types
from sc_tune.modeling import load_model_and_adapter
from sc_tune.adapters.base import LOCATOR_BUDGET_MARGIN
from sc_tune.rollout import GenerationSettings, completion_mask, fit_locator_budget, generate, locate
from tests.conftest import SAMPLE_IMAGES

FAMILIES = supported_model_types()


def test_completion_mask_keeps_the_first_end_token_only():
    ids = torch.tensor([[5, 6, 9, 7, 9], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    assert completion_mask(ids, [9]).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert completion_mask(ids, [9, 5]).tolist()[0] == [1, 0, 0, 0, 0]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint(request.param))
    image = adapter.prepare_image(Image.open(f"{SAMPLE_IMAGES}/images/003.png"))
    return model.eval(), adapter, image


def test_batch_is_left_padded_with_labels_on_targets_only(family):
    _, adapter, image = family
    box = [0.125, 0.25, 0.5, 0.75]
    prompts = [adapter.locator_prompt("the red circle", image), adapter.locator_prompt("a", image)]
    targets = [adapter.locator_target(box, image), adapter.locator_target(box, image)]
    batch = adapter.build_batch(prompts, [image, image], targets)
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels
    target_ids = adapter.encode_target(targets[0])
    for row in range(2):
        assert labels[row, -len(target_ids) :].tolist() == target_ids  # targets end every row
        assert (labels[row, : -len(target_ids)] == -100).all()
    assert mask[1, 0] == 0 and mask[0].all()  # the shorter prompt is padded on the left
    assert (ids[1][mask[1] == 0] == adapter.pad_token_id).all()
    assert adapter.end_token_ids[0] == target_ids[-1]  # the answer ends with the family's end token
    # the target text parses back to the box (within the family's grid)
    parsed = adapter.parse_locator_output(targets[0], image)
    assert parsed == pytest.approx(box, abs=1.0 / min(image.frame + (999,)))


def test_generation_pads_after_the_end_and_teacher_forcing_lines_up(family):
    model, adapter, image = family
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.1, 0.6, 0.6], image)] * 2, [image, image])
    torch.manual_seed(0)
    out = generate(
        model,
        adapter,
        batch,
        GenerationSettings(max_new_tokens=6, do_sample=True, top_k=50, top_p=1.0),
        skip_special_tokens=True,
    )
    assert out.ids_BT.shape[0] == 2 and out.ids_BT.shape[1] <= 6
    assert (out.ids_BT[out.mask_BT == 0] == adapter.pad_token_id).all()
    assert (out.ids_BT < len(adapter.tokenizer)).all()  # only ids the tokenizer can decode
    inputs = adapter.append_completion(batch, out.ids_BT, out.mask_BT)
    assert inputs["input_ids"].shape[1] == batch.inputs["input_ids"].shape[1] + out.ids_BT.shape[1]
    for key in adapter.per_token_keys:
        assert inputs[key].shape == inputs["input_ids"].shape
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_locator_budget_fits_the_longest_box_and_failures_are_none(family):
    model, adapter, image = family
    fitted = fit_locator_budget(adapter, [image], GenerationSettings(max_new_tokens=5))
    target = adapter.locator_target([1.0, 1.0, 1.0, 1.0], image, "the red circle")
    through_box = adapter.encode_target(target[: adapter.codec.box_end(target)])
    # The widest box answer up to its box's end, plus the margin; an answer cut there still reads.
    assert fitted.max_new_tokens == len(through_box) + LOCATOR_BUDGET_MARGIN
    cut = adapter.tokenizer.decode(adapter.encode_target(target)[: fitted.max_new_tokens - LOCATOR_BUDGET_MARGIN])
    assert adapter.parse_locator_output(cut, image) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    boxes, texts = locate(model, adapter, [image], ["the red circle"], GenerationSettings(max_new_tokens=3))
    assert len(texts) == 1 and (boxes[0] is None or len(boxes[0]) == 4)  # a random model: usually None
