"""An experiment YAML is checked before any work starts; errors name the key and the file (or the override)."""
import glob
import os
import shutil

import pytest
import torch

from cid_ds.config import (CHOICES, Config, ConfigError, allowed_values, check_deepspeed_json, config_source,
                           expand_shards, load_config)
from cid_ds.sources import check_sources
from tests.helpers import REPO_ROOT


@pytest.fixture
def setup(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"{i:05d}.tar").write_bytes(b"")
    ds = tmp_path / "zero2.json"
    ds.write_text("{}")

    def write(body: str) -> str:
        path = tmp_path / "exp.yaml"
        path.write_text(f"deepspeed_config: {ds}\nmodel:\n  student: demo-student\n"
                        f"data:\n  train_shards: {shards}/{{00000..00002}}.tar\n{body}")
        return str(path)
    return write


def load_checked(path: str, overrides: list[str] = ()) -> Config:
    """As the trainer checks a config before any work: its keys, then the artifacts it names."""
    cfg = load_config(path, overrides)
    check_sources(cfg, config_source(path, overrides))
    return cfg


def test_a_valid_yaml_loads_into_typed_sections(setup):
    cfg = load_config(setup("optim:\n  lr: 1\n  steps: 10\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 10 and cfg.model.student == "demo-student"


def test_unknown_key_is_named_with_the_file(setup):
    path = setup("optim:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key 'optim\.learning_rate'"):
        load_config(path)


def test_every_key_with_choices_has_them_where_its_module_defines_them():
    for key in CHOICES:
        assert allowed_values(key), key


def test_wrong_type_is_named(setup):
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'optim\.steps' must be int, got 'many'"):
        load_config(setup("optim:\n  steps: many\n"))
    with pytest.raises(ConfigError, match=r"key 'data\.missing_features' must be one of"):
        load_config(setup("data:\n  missing_features: ignore\n"))


def test_missing_files_are_named_before_any_work(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'deepspeed_config': file not found: /nonexistent.json"):
        load_config(setup(""), ["deepspeed_config=/nonexistent.json"])
    with pytest.raises(ConfigError, match=r"key 'data\.train_shards': no such shard: .*00003\.tar"):
        load_config(setup(""), [f"data.train_shards={tmp_path}/shards/{{00000..00009}}.tar"])
    with pytest.raises(ConfigError, match=r"key 'data\.features': file not found: .*nofeats/manifest\.json"):
        load_checked(setup(""), [f"data.features={tmp_path}/nofeats"])
    with pytest.raises(ConfigError, match=r"key 'eval\.sets\[0\]': dir not found"):
        load_config(setup("eval:\n  sets: [/no/such/set]\n"))


def test_multi_label_positives_and_soft_labels_are_not_combined(setup):
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'cluster\.positives' > 1 is the hard-label multi-label "
                                          r"loss; cluster\.soft already scores every centroid"):
        load_config(setup("loss:\n  cluster: 0.1\ncluster:\n  dir: c\n  soft: true\n  positives: 8\n"))


def test_instance_distillation_needs_a_feature_cache(setup):
    with pytest.raises(ConfigError, match=r"'loss\.instance' > 0 needs 'data\.features'"):
        load_checked(setup("loss:\n  instance: 1.0\n"))


@pytest.mark.parametrize("term", ["fd", "crd", "icl", "mfd", "gd", "afd"])
def test_every_kd_term_needs_a_teacher_cached_or_online(setup, term):
    with pytest.raises(ConfigError, match=rf"'loss\.{term}' > 0 needs 'data\.features' .* or kd\.teacher: online"):
        load_checked(setup(f"loss:\n  {term}: 1.0\n"))
    cfg = load_config(setup(f"loss:\n  {term}: 1.0\nmodel:\n  student: demo-student\n  teacher: demo-teacher\n"
                            "  teacher_random_ok: true\nkd:\n  teacher: online\n"))
    assert getattr(cfg.loss, term) == 1.0 and cfg.kd.teacher == "online"


def test_kd_options_are_checked(setup):
    with pytest.raises(ConfigError, match=r"key 'kd\.teacher' must be one of \('cached', 'online'\)"):
        load_config(setup("kd:\n  teacher: live\n"))
    with pytest.raises(ConfigError, match=r"'kd\.teacher' is online but 'model\.teacher' is not set"):
        load_config(setup("kd:\n  teacher: online\nloss:\n  fd: 1.0\n"))
    with pytest.raises(ConfigError, match=r"'loss\.instance' and 'loss\.icl' are the same term"):
        load_config(setup("kd:\n  teacher: online\nloss:\n  instance: 1.0\n  icl: 1.0\n"),
                    ["model.teacher=demo-teacher", "model.teacher_random_ok=true"])
    with pytest.raises(ConfigError, match=r"key 'kd\.mask_ratio' must be in \(0, 1\), got 1\.0"):
        load_config(setup("kd:\n  mask_ratio: 1.0\n"))


def test_command_line_overrides_use_dotted_keys_and_the_same_checks(setup):
    cfg = load_config(setup(""), ["optim.lr=3e-4", "data.batch_size=32", "eval.sets=[]"])
    assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 32
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        load_config(setup(""), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(setup(""), ["optim.lr"])


def test_relative_paths_resolve_against_the_current_directory_not_the_yamls_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    for folder in ("shards", "evals/shapes", "runs/x/checkpoints/step00000002"):
        (work / folder).mkdir(parents=True)
    for name in ("shards/00000.tar", "shards/00001.tar", "weights.pt"):
        (work / name).write_bytes(b"")
    (work / "zero0.json").write_text("{}")
    yaml_file = tmp_path / "yamls" / "exp.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(
        "output_dir: runs/x\ndeepspeed_config: zero0.json\n"
        "model:\n  student: local-dir:students/s\n  student_pretrained: weights.pt\n"
        "  teacher: ViT-B-32\n  teacher_pretrained: openai\n"
        "data:\n  train_shards: shards/{00000..00001}.tar\n  features: ./feats\n"
        "cluster:\n  dir: clusters\nlogging:\n  tensorboard_dir: /abs/tb\neval:\n  sets: [evals/shapes]\n")
    monkeypatch.chdir(work)
    cfg = load_config(str(yaml_file), ["checkpoint.resume=runs/x/checkpoints/step00000002"])
    assert cfg.output_dir == f"{work}/runs/x" and cfg.deepspeed_config == f"{work}/zero0.json"
    assert (cfg.model.student, cfg.model.student_pretrained) == (f"local-dir:{work}/students/s", f"{work}/weights.pt")
    assert (cfg.model.teacher, cfg.model.teacher_pretrained) == ("ViT-B-32", "openai")  # a name and a tag
    assert cfg.data.train_shards == f"{work}/shards/{{00000..00001}}.tar" and cfg.data.features == f"{work}/feats"
    assert cfg.cluster.dir == f"{work}/clusters" and cfg.eval.sets == [f"{work}/evals/shapes"]
    assert cfg.logging.tensorboard_dir == "/abs/tb"  # absolute: as it is
    assert cfg.checkpoint.resume == f"{work}/runs/x/checkpoints/step00000002"
    assert load_config(str(yaml_file), check_paths=False).checkpoint.resume == "auto"


def test_brace_patterns_and_globs_expand_in_order(setup, tmp_path):
    assert [p[-9:] for p in expand_shards(f"{tmp_path}/shards/{{00000..00002}}.tar")] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    assert len(expand_shards(f"{tmp_path}/shards/*.tar")) == 3


def test_the_shipped_experiment_yamls_have_only_known_keys():
    import glob
    for path in glob.glob("ds_configs/experiments/*.yaml"):
        load_config(path, check_paths=False)


@pytest.mark.parametrize("key, value, rule", [
    ("checkpoint.every", 0, "> 0"), ("checkpoint.keep", 0, "> 0"), ("data.batch_size", 0, "> 0"),
    ("logging.every", 0, "> 0"), ("optim.steps", -1, "> 0"), ("optim.lr", -1e-3, "> 0"), ("optim.lr", 0, "> 0"),
    ("optim.warmup_steps", -5, ">= 0"), ("optim.betas", [0.9, 1.0], r"in \[0, 1\)"), ("loss.fd", -1, ">= 0"),
    ("cluster.sample_rate", 1.5, r"in \(0, 1\]"), ("kd.mask_ratio", 0, r"in \(0, 1\)"),
    ("kd.teacher_weights", [1, -1], ">= 0"), ("cluster.positives", 0, "> 0"), ("cluster.text_weight", -1, ">= 0"),
])
def test_a_value_that_cannot_work_is_refused_naming_key_and_file(setup, key, value, rule):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"exp\.yaml: key '{key}' must be {rule}, got "):
        load_config(setup(f"{section}:\n  {name}: {value}\n"))


def test_an_override_error_names_the_override_not_the_file(setup):
    for override, message in (("optim.lrr=1", "unknown key 'optim.lrr'"),
                              ("checkpoint.every=0", "key 'checkpoint.every' must be > 0, got 0"),
                              ("data.batch_size=many", "key 'data.batch_size' must be int")):
        with pytest.raises(ConfigError) as refused:
            load_config(setup(""), [override])
        assert str(refused.value).startswith(f"override '{override}': {message}")


def test_a_deepspeed_json_with_an_unknown_key_is_refused_naming_it_and_the_nearest(setup, tmp_path):
    ds = tmp_path / "typo.json"
    ds.write_text('{"zero_optimisation": {"stage": 2}}')
    with pytest.raises(ConfigError, match=r"typo\.json: unknown DeepSpeed key 'zero_optimisation' "
                                          r"\(did you mean 'zero_optimization'\?\)"):
        load_config(setup(""), [f"deepspeed_config={ds}"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "ds_configs", "*.json"))),
                         ids=os.path.basename)
def test_the_shipped_deepspeed_jsons_have_only_keys_deepspeed_reads(path):
    check_deepspeed_json(path)


def saved_weights(path, seed: int) -> dict:
    """The state dict of a demo-teacher initialised from ``seed``, saved to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    from cid_ds.models import create_model
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in create_model("demo-teacher")[0].state_dict().items()}
    save_file(state, str(path))
    return state


def test_pretrained_weights_are_loaded_into_local_dir_and_ds_configs_models(tmp_path):
    from cid_ds.models import MODEL_CONFIG_DIR, create_model
    state = saved_weights(tmp_path / "trained.safetensors", seed=7)
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    shutil.copy(os.path.join(MODEL_CONFIG_DIR, "demo-teacher", "open_clip_config.json"), folder)
    for spec in ("demo-teacher", f"local-dir:{folder}"):
        model = create_model(spec, str(tmp_path / "trained.safetensors"))[0]
        torch.testing.assert_close(model.state_dict()["text_projection"], state["text_projection"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="takes a checkpoint file, not an open_clip tag"):
        create_model("demo-teacher", "openai")


def test_a_teacher_without_trained_weights_is_refused_unless_meant(setup, tmp_path):
    from cid_ds.teacher import load_teacher
    from data_tools.extract import main as extract_main
    with pytest.raises(ValueError, match="teacher 'demo-teacher' has no trained weights"):
        load_teacher("demo-teacher", None)
    load_teacher("demo-teacher", None, random_ok=True)
    saved_weights(tmp_path / "w.safetensors", seed=1)
    load_teacher("demo-teacher", str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"exp\.yaml with overrides model\.teacher=demo-teacher: "
                                          r"key 'model\.teacher' demo-teacher has no trained weights"):
        load_checked(setup("kd:\n  teacher: online\n"), ["model.teacher=demo-teacher"])
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match="extract: teacher 'demo-teacher' has no trained weights"):
        extract_main(["--shards", str(tmp_path / "00000.tar"), "--teacher", "demo-teacher",
                      "--out", str(tmp_path / "feats")])
