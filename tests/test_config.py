"""An experiment YAML is checked before any work starts; errors name the key and the file."""
import pytest

from cid_ds.config import ConfigError, expand_shards, load_config


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


def test_a_valid_yaml_loads_into_typed_sections(setup):
    cfg = load_config(setup("optim:\n  lr: 1\n  steps: 10\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 10 and cfg.model.student == "demo-student"


def test_unknown_key_is_named_with_the_file(setup):
    path = setup("optim:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key 'optim\.learning_rate'"):
        load_config(path)


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
        load_config(setup(""), [f"data.features={tmp_path}/nofeats"])
    with pytest.raises(ConfigError, match=r"key 'eval\.sets\[0\]': dir not found"):
        load_config(setup("eval:\n  sets: [/no/such/set]\n"))


def test_instance_distillation_needs_a_feature_cache(setup):
    with pytest.raises(ConfigError, match=r"'loss\.instance' > 0 needs 'data\.features'"):
        load_config(setup("loss:\n  instance: 1.0\n"))


@pytest.mark.parametrize("term", ["fd", "crd", "icl", "mfd", "gd", "afd"])
def test_every_kd_term_needs_a_teacher_cached_or_online(setup, term):
    with pytest.raises(ConfigError, match=rf"'loss\.{term}' > 0 needs 'data\.features' .* or kd\.teacher: online"):
        load_config(setup(f"loss:\n  {term}: 1.0\n"))
    cfg = load_config(setup(f"loss:\n  {term}: 1.0\nmodel:\n  student: demo-student\n  teacher: demo-teacher\n"
                            "kd:\n  teacher: online\n"))
    assert getattr(cfg.loss, term) == 1.0 and cfg.kd.teacher == "online"


def test_kd_options_are_checked(setup):
    with pytest.raises(ConfigError, match=r"key 'kd\.teacher' must be one of \('cached', 'online'\)"):
        load_config(setup("kd:\n  teacher: live\n"))
    with pytest.raises(ConfigError, match=r"'kd\.teacher' is online but 'model\.teacher' is not set"):
        load_config(setup("kd:\n  teacher: online\nloss:\n  fd: 1.0\n"))
    with pytest.raises(ConfigError, match=r"'loss\.instance' and 'loss\.icl' are the same term"):
        load_config(setup("kd:\n  teacher: online\nloss:\n  instance: 1.0\n  icl: 1.0\n"),
                    ["model.teacher=demo-teacher"])
    with pytest.raises(ConfigError, match=r"key 'kd\.mask_ratio' must be in \(0, 1\), got 1\.0"):
        load_config(setup("kd:\n  mask_ratio: 1.0\n"))


def test_command_line_overrides_use_dotted_keys_and_the_same_checks(setup):
    cfg = load_config(setup(""), ["optim.lr=3e-4", "data.batch_size=32", "eval.sets=[]"])
    assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 32
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        load_config(setup(""), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(setup(""), ["optim.lr"])


def test_brace_patterns_and_globs_expand_in_order(setup, tmp_path):
    assert [p[-9:] for p in expand_shards(f"{tmp_path}/shards/{{00000..00002}}.tar")] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    assert len(expand_shards(f"{tmp_path}/shards/*.tar")) == 3


def test_the_shipped_experiment_yamls_have_only_known_keys():
    import glob
    for path in glob.glob("ds_configs/experiments/*.yaml"):
        load_config(path, check_paths=False)
