"""Evaluators end to end in one process: a scripted model (known answers, so exact IoUs through the real
adapters, codecs and the REC pixel mapping) and a tiny random model through evaluate.py."""

import json

import pytest
import torch
from PIL import Image

from sc_tune.adapters import adapter_class
from sc_tune.evaluation import evaluate_rec, evaluate_region_captions, evaluate_self_consistency
from sc_tune.tiny.chat import build_tokenizer
from sc_tune.tiny.configs import tiny_spec
from sc_tune.rollout import LOCATOR_BUDGET_MARGIN
from sc_tune.tiny import save_tiny

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


class ScriptedVLM(torch.nn.Module):
    """Answers each prompt from a table: the first key found in the decoded prompt picks the answer text
    (which includes the end token); anything else gets a box-less answer. Records every prompt it saw."""

    def __init__(self, adapter, table: dict[str, str], default: str = "no box here"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # rollout reads the device from a parameter
        self.adapter, self.table, self.default = adapter, table, default + adapter.end_text
        self.prompts, self.modes = [], []  # the prompts seen, and whether each call ran in training mode

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.modes.append(self.training)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.adapter.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
            self.prompts.append(prompt)
            answer = next((a for key, a in self.table.items() if key in prompt), self.default)
            rows.append(self.adapter.encode_target(answer)[:max_new_tokens])
        new_BT = torch.full((len(rows), max(map(len, rows))), self.adapter.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            new_BT[i, : len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new_BT], dim=1)


def make_adapter(family):
    spec = tiny_spec(family)
    return adapter_class(family)(build_tokenizer(spec), spec.image_processor(56))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), (200, 40, 40)).save(root / "red.png")
    Image.new("RGB", (80, 60), (40, 40, 200)).save(root / "blue.png")
    return root


# Five records (odd, batches of 2 leave a remainder). true box -> caption -> re-grounded box, IoU:
#   0: [.25,.5,.75,1] -> alpha   -> [.25,.5,.75,1]   IoU 1
#   1: [0,0,.5,.5]    -> beta    -> [.25,0,.75,.5]   overlap .25*.5 = .125, union .25+.25-.125 = .375 -> 1/3
#   2: [0,0,1,1]      -> ""      -> no box           an empty caption; parse failure, IoU 0; the answer has no
#                                                    end token either (cut off)
#   3: [0,0,.5,1]     -> delta   -> [0,0,1,1]        .5/1 = .5 (a hit: Acc@0.5 is inclusive)
#   4: [.5,.5,1,1]    -> epsilon -> [0,0,.5,.5]      0
# mean IoU = (1 + 1/3 + 0 + .5 + 0)/5 = 0.36667, Acc@0.5 = 2/5, parse failures 1/5,
# mean IoU over parsed = 1.8333/4 = 0.45833. Every box is a multiple of 1/4, exact on every codec's grid.
# The longer caption of 4 makes the locator's fitted budget of its batch larger where the answer repeats the caption.
SC_CASES = [
    ([0.25, 0.5, 0.75, 1.0], "alpha thing", [0.25, 0.5, 0.75, 1.0]),
    ([0.0, 0.0, 0.5, 0.5], "beta thing", [0.25, 0.0, 0.75, 0.5]),
    ([0.0, 0.0, 1.0, 1.0], "", None),
    ([0.0, 0.0, 0.5, 1.0], "delta thing", [0.0, 0.0, 1.0, 1.0]),
    ([0.5, 0.5, 1.0, 1.0], "epsilon thing of the far corner", [0.0, 0.0, 0.5, 0.5]),
]


def scripted_cycle_model(adapter, image_root):
    image = adapter.prepare_image(Image.open(image_root / "red.png"))
    table = {}
    for true_box, caption, answer_box in SC_CASES:
        table[adapter.codec.format(true_box, image.frame)] = adapter.describer_target(caption)
        if answer_box is not None:
            table[caption] = adapter.locator_target(answer_box, image, caption)
    model = ScriptedVLM(adapter, table)
    model.default = "no box here"  # what the locator says of the empty caption: no box and no end token
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_self_consistency_exact_metrics(family, image_root):
    adapter = make_adapter(family)
    model = scripted_cycle_model(adapter, image_root)
    model.train()
    prepared = []
    original_prepare = adapter.prepare_image
    adapter.prepare_image = lambda pil: prepared.append(1) or original_prepare(pil)
    records = [{"image": "red.png", "bbox": box, "caption": "ref " + cap} for box, cap, _ in SC_CASES]

    metrics, per_sample = evaluate_self_consistency(model, adapter, records, image_root, batch_size=2)

    assert metrics["num_samples"] == metrics["num_records"] == 5
    assert metrics["num_parse_failures"] == 1 and metrics["parse_failure_rate"] == pytest.approx(0.2)
    assert metrics["mean_iou"] == pytest.approx((1 + 1 / 3 + 0.5) / 5)
    assert metrics["mean_iou_parsed"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)
    assert metrics["acc@0.5"] == pytest.approx(0.4)
    assert [s["index"] for s in per_sample] == [0, 1, 2, 3, 4]
    assert [s["caption"] for s in per_sample] == [cap for _, cap, _ in SC_CASES]
    assert [s["pred_bbox"] for s in per_sample] == [ans for _, _, ans in SC_CASES]
    assert per_sample[2]["parsed"] is False and per_sample[0]["reference_caption"] == "ref alpha thing"
    assert metrics["num_empty_captions"] == 1
    assert [s["locator_finished"] for s in per_sample] == [True, True, False, True, True]
    assert metrics["num_locator_unfinished"] == 1
    budgets = [s["locator_max_new_tokens"] for s in per_sample]
    assert metrics["locator_max_new_tokens"] == max(budgets)
    assert family != "qwen2_vl" or min(budgets) < max(budgets)  # its answer repeats the caption
    assert len(prepared) == 5  # each image preprocessed once, shared by the describer and locator prompts
    assert len(model.prompts) == 10 and model.training  # 5 describer + 5 locator prompts; mode restored
    assert model.modes and not any(model.modes)  # every call ran in eval mode


@pytest.mark.parametrize("family", FAMILIES)
def test_rec_maps_boxes_back_to_the_original_image(family, image_root):
    adapter = make_adapter(family)
    image = adapter.prepare_image(Image.open(image_root / "blue.png"))
    model = ScriptedVLM(adapter, {
        "alpha thing": adapter.locator_target([0.25, 0.5, 0.75, 1.0], image, "alpha thing"),
        "beta thing": adapter.locator_target([0.0, 0.0, 0.5, 0.5], image, "beta thing"),
    })
    # Image 80 x 60 px. alpha: normalised [.25,.5,.75,1] -> [20,30,60,60] px = the target: IoU 1.
    # beta: [0,0,.5,.5] -> [0,0,40,30] vs target [20,0,60,30]: overlap 20*30 = 600, union 1200+1200-600
    # = 1800 -> 1/3. gamma: no box -> parse failure. Acc@0.5 = 1/3, mean IoU = (1 + 1/3)/3 = 4/9.
    samples = [
        {"image": "blue.png", "sent": "alpha thing", "bbox": [20, 30, 60, 60], "width": 80, "height": 60},
        {"image": "blue.png", "sent": "beta thing", "bbox": [20, 0, 60, 30], "width": 80, "height": 60},
        {"image": "blue.png", "sent": "gamma thing", "bbox": [0, 0, 80, 60], "width": 80, "height": 60},
    ]
    metrics, per_sample = evaluate_rec(model, adapter, samples, image_root, batch_size=2)
    assert metrics["num_samples"] == 3 and metrics["num_parse_failures"] == 1
    assert metrics["acc@0.5"] == pytest.approx(1 / 3) and metrics["mean_iou"] == pytest.approx(4 / 9)
    assert per_sample[0]["pred_bbox"] == pytest.approx([20, 30, 60, 60])
    assert per_sample[1]["pred_bbox"] == pytest.approx([0, 0, 40, 30])
    assert per_sample[2]["pred_bbox"] is None and metrics["num_image_size_mismatches"] == 0


def test_rec_counts_records_whose_size_is_not_their_images_and_reports_the_largest_budget(image_root):
    # Qwen2-VL's answer repeats the sentence, so the longer sentence gets a larger fitted budget in its batch of one.
    # The second record says its 80 x 60 image is 160 x 120: its box is mapped to those pixels and still scores IoU 1,
    # but the mismatch is counted.
    adapter = make_adapter("qwen2_vl")
    image = adapter.prepare_image(Image.open(image_root / "blue.png"))
    long_sentence = "beta thing in the far corner of the picture"
    model = ScriptedVLM(adapter, {"alpha thing": adapter.locator_target([0.25, 0.5, 0.75, 1.0], image, "alpha thing"),
                                  long_sentence: adapter.locator_target([0.0, 0.0, 0.5, 0.5], image, long_sentence)})
    samples = [{"image": "blue.png", "sent": "alpha thing", "bbox": [20, 30, 60, 60], "width": 80, "height": 60},
               {"image": "blue.png", "sent": long_sentence, "bbox": [0, 0, 80, 60], "width": 160, "height": 120}]
    metrics, per_sample = evaluate_rec(model, adapter, samples, image_root, batch_size=1)
    assert metrics["acc@0.5"] == 1.0 and per_sample[1]["pred_bbox"] == pytest.approx([0, 0, 80, 60])
    assert [s["size_matches"] for s in per_sample] == [True, False] and metrics["num_image_size_mismatches"] == 1
    budgets = [s["locator_max_new_tokens"] for s in per_sample]
    assert budgets[0] < budgets[1] == metrics["locator_max_new_tokens"]


def test_region_captions_scored_against_references(image_root):
    adapter = make_adapter("qwen2_vl")
    image = adapter.prepare_image(Image.open(image_root / "red.png"))
    a, b = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
    model = ScriptedVLM(adapter, {adapter.codec.format(a, image.frame): adapter.describer_target("the big red circle"),
                                  adapter.codec.format(b, image.frame): adapter.describer_target("the small green square")})
    # The corpus of tests/test_metrics.py: CIDEr-D (10 + 2.5)/2 = 6.25, BLEU-1 7/8.
    records = [{"image": "red.png", "bbox": a, "captions": ["the big red circle"]},
               {"image": "red.png", "bbox": b, "caption": "the small blue square"}]
    metrics, per_sample = evaluate_region_captions(model, adapter, records, image_root, batch_size=1,
                                                   use_meteor=False)
    assert metrics["num_samples"] == 2 and metrics["cider_d"] == pytest.approx(6.25)
    assert metrics["bleu_1"] == pytest.approx(7 / 8) and metrics["meteor_skipped"]
    assert [s["cider_d"] for s in per_sample] == pytest.approx([10.0, 2.5])
    assert per_sample[1]["references"] == ["the small blue square"]


def test_region_captions_count_empty_captions_and_try_meteor_by_default(image_root):
    from sc_tune.evaluation.caption_metrics import meteor_unavailable_reason

    adapter = make_adapter("qwen2_vl")
    image = adapter.prepare_image(Image.open(image_root / "red.png"))
    answers = {(0.0, 0.0, 0.5, 0.5): "the big red circle", (0.5, 0.5, 1.0, 1.0): "", (0.0, 0.0, 1.0, 1.0): "a red image"}
    model = ScriptedVLM(adapter, {adapter.codec.format(list(box), image.frame): adapter.describer_target(caption)
                                  for box, caption in answers.items()})
    records = [{"image": "red.png", "bbox": list(box), "captions": ["the small blue square"]} for box in answers]
    metrics, per_sample = evaluate_region_captions(model, adapter, records, image_root, batch_size=2)
    assert [s["caption"] for s in per_sample] == list(answers.values()) and metrics["num_empty_captions"] == 1
    assert per_sample[1]["cider_d"] == 0.0
    if meteor_unavailable_reason() is None:
        assert 0.0 < metrics["meteor"] <= 1.0
    else:
        assert metrics["meteor"] is None and metrics["meteor_skipped"] == meteor_unavailable_reason()


# ---------------------------------------------------------------- evaluate.py with a tiny random model
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_root):
    root = tmp_path_factory.mktemp("tiny_eval")
    model_dir = save_tiny(root / "model", "qwen2_vl")
    held_out = root / "held_out.json"
    held_out.write_text(json.dumps([{"image": "red.png", "bbox": box} for box, _, _ in SC_CASES]))
    rec = root / "refs.jsonl"
    rec.write_text("".join(json.dumps({"image": "blue.png", "sent": s, "bbox": [20, 0, 60, 30], "width": 80,
                                       "height": 60}) + "\n" for s in ("the red circle", "a blue square", "x")))
    regions = root / "regions.json"
    regions.write_text(json.dumps([{"image": "red.png", "bbox": box, "captions": ["the red circle", "a red shape"]}
                                   for box, _, _ in SC_CASES[:3]]))
    return root, model_dir, {"self-consistency": held_out, "rec": rec, "region-caption": regions}


@pytest.mark.parametrize("task,expected_count", [("self-consistency", 5), ("rec", 3), ("region-caption", 3)])
def test_evaluate_cli_tiny_model(task, expected_count, tiny_run, image_root):
    import evaluate

    root, model_dir, data = tiny_run
    out = root / f"out_{task}"
    evaluate.main(["--task", task, "--model_name_or_path", model_dir, "--data_path", str(data[task]),
                   "--image_folder", str(image_root), "--output_dir", str(out), "--per_device_eval_batch_size", "2",
                   "--no_meteor", "--grid_samples", "4"])
    name = task.replace("-", "_")
    result = json.loads((out / f"{name}_metrics.json").read_text())
    if task == "rec":
        metrics = result["results"]["refs"]
        samples = (out / "rec_refs_samples.jsonl").read_text().splitlines()
    else:
        metrics = result["metrics"]
        samples = (out / f"{name}_samples.jsonl").read_text().splitlines()
    assert metrics["num_samples"] == metrics["num_records"] == expected_count == len(samples)
    assert result["world_size"] == 1
    if task != "region-caption":
        # A random model writes no box: every failure is counted, none hidden in a zero.
        rows = [json.loads(line) for line in samples]
        assert metrics["num_parse_failures"] == expected_count == sum(r["pred_bbox"] is None for r in rows)
        assert metrics["parse_failure_rate"] == 1.0 and all(r["iou"] == 0.0 and not r["parsed"] for r in rows)
    else:
        assert metrics["meteor"] is None and "disabled" in metrics["meteor_skipped"]
        assert {"bleu_1", "bleu_4", "cider_d"} <= set(metrics)
    if task == "self-consistency":
        grid = Image.open(out / "self_consistency_cycles.png")
        assert grid.width > 4 * 200 and grid.height > 256


def test_a_fixed_20_token_locator_budget_cuts_json_boxes_and_is_reported(image_root):
    # Qwen3-VL's answer, the fenced JSON list, is 31 tokens up to its box's end (digits one per token): with the
    # reference's 20-token budget the answer is cut off -> a counted parse failure, flagged as unfinished.
    adapter = make_adapter("qwen3_vl")
    image = adapter.prepare_image(Image.open(image_root / "blue.png"))
    model = ScriptedVLM(adapter, {"alpha thing": adapter.locator_target([0.25, 0.5, 0.75, 1.0], image, "alpha thing")})
    sample = [{"image": "blue.png", "sent": "alpha thing", "bbox": [20, 30, 60, 60], "width": 80, "height": 60}]
    fixed, _ = evaluate_rec(model, adapter, sample, image_root, fit_budget=False)
    assert fixed["num_parse_failures"] == 1 and fixed["num_locator_unfinished"] == 1
    assert fixed["locator_max_new_tokens"] == 20
    fitted, _ = evaluate_rec(model, adapter, sample, image_root)
    assert fitted["acc@0.5"] == 1.0 and fitted["num_locator_unfinished"] == 0
    # The same in the self-consistency cycle: its locator keeps the budget it is given unless asked to fit it.
    records = [{"image": "red.png", "bbox": SC_CASES[0][0]}]
    cycle_fixed, _ = evaluate_self_consistency(scripted_cycle_model(adapter, image_root), adapter, records, image_root,
                                               fit_budget=False)
    assert cycle_fixed["num_parse_failures"] == 1 and cycle_fixed["locator_max_new_tokens"] == 20
    cycle_fitted, _ = evaluate_self_consistency(scripted_cycle_model(adapter, image_root), adapter, records, image_root)
    assert cycle_fitted["acc@0.5"] == 1.0 and cycle_fitted["num_locator_unfinished"] == 0
    # The widest documented layout (Qwen's OCR cookbook: 4 / 8 spaces), every coordinate 1000, up to the box's
    # end, in this tiny vocabulary: '```', 'json', '\n', '[\n', '   ', ' {\n', '       ', ' "', 'bbox', '_', '2',
    # 'd', '":', ' [' (14) + 16 digits + 3 x (',', ' ') (6) + ']' = 37 tokens; + the 8-token margin.
    assert fitted["locator_max_new_tokens"] == 37 + LOCATOR_BUDGET_MARGIN == 45
