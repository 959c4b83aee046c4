"""Tests for normbench.config: composition and descriptions (the checks: test_validation.py)."""

import pytest

from normbench.config import GROUPS, compose, describe_groups, flatten, group_options
from normbench.errors import UserError


def test_defaults_compose_to_the_embedded_default():
    cfg = compose()
    assert (cfg.model.name, cfg.norm.name, cfg.dataset.name, cfg.optim.name) == (
        "small_cnn",
        "custom_bn",
        "digits",
        "sgd",
    )
    assert cfg.out_dir == "results" and cfg.name == "default" and cfg.device == "auto"
    assert cfg.dataset.root == "data" and cfg.dataset.download is False


def test_the_issues_command_composes_exactly_as_written():
    cfg = compose(
        ["norm=batch_renorm", "batch_size=8", "lr=0.05", "epochs=3"]
        + ["model=resnet20", "dataset=cifar10", "seed=1"]
    )
    assert cfg.norm.name == "batch_renorm"
    assert cfg.model.name == "resnet20"
    assert cfg.dataset.name == "cifar10"
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.seed) == (8, 0.05, 3, 1)


def test_group_keys_can_be_overridden():
    cfg = compose(["norm=group", "norm.groups=4", "dataset.train_size=100"])
    assert cfg.norm.groups == 4 and cfg.dataset.train_size == 100


def test_design_groups_have_the_design_options():
    assert set(group_options("model")) == {"small_cnn", "resnet20", "mlp"}
    # A variant added later adds an option; DESIGN.md's are all there.
    assert set(group_options("norm")) >= {
        "custom_bn",
        "torch_bn",
        "layer",
        "instance",
        "group",
        "batch_renorm",
        "ghost_bn",
        "none",
        "frn",
        "rms",
        "evonorm_s0",
    }
    assert set(group_options("dataset")) == {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
    }
    assert set(group_options("optim")) == {"sgd", "adam"}


def test_every_option_has_a_description():
    described = describe_groups()
    assert set(described) == set(GROUPS)
    for group, options in described.items():
        assert options, group
        for option, description in options:
            assert description, f"{group}/{option}.yaml has no description comment"


def test_every_option_of_every_group_composes():
    for group in GROUPS:
        for option in group_options(group):
            cfg = compose([f"{group}={option}"])
            if group == "logger":  # a tracker's keys under its name; none: no keys
                assert list(cfg.logger or {}) == ([] if option == "none" else [option])
            elif group != "experiment":
                assert cfg[group].name == option


@pytest.mark.parametrize(
    "override, expected",
    [
        ("norm=batchnorm", "unknown norm 'batchnorm'"),
        ("model=resnet50", "unknown model 'resnet50'"),
        ("dataset=imagenet", "unknown dataset 'imagenet'"),
        ("optim=lion", "unknown optim 'lion'"),
        ("experiment=nope", "unknown experiment 'nope'"),
    ],
)
def test_unknown_group_option_lists_the_valid_ones(override, expected):
    with pytest.raises(UserError) as info:
        compose([override])
    message = str(info.value)
    assert expected in message
    group = override.split("=")[0]
    for option in group_options(group):
        assert option in message


def test_unknown_option_inside_a_sweep_is_caught():
    with pytest.raises(UserError, match="unknown norm 'foo'"):
        compose(["norm=custom_bn,foo"])


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(UserError, match="unknown config key 'batchsize'.*batch_size"):
        compose(["batchsize=8"])


def test_unparsable_override():
    with pytest.raises(UserError, match="cannot parse"):
        compose(["batch_size=[1,"])


def test_flatten_gives_dotted_keys():
    flat = flatten(compose(["norm=group"]))
    assert flat["norm.name"] == "group" and flat["batch_size"] == 128
    assert "schedule.milestones" in flat


def test_default_options_are_those_config_yaml_picks():
    from normbench.config import default_options

    assert default_options() == {
        "model": "small_cnn",
        "norm": "custom_bn",
        "dataset": "digits",
        "optim": "sgd",
        "logger": "none",
    }


def test_an_experiment_preset_overrides_the_defaults_and_the_command_line_wins():
    cfg = compose(["experiment=smoke"])
    assert (cfg.name, cfg.epochs, cfg.batch_size, cfg.dataset.train_size) == ("smoke", 1, 32, 512)
    cfg = compose(["experiment=smoke", "epochs=2", "name=mine"])
    assert (cfg.name, cfg.epochs) == ("mine", 2)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("+foo=1", "unknown config key 'foo'"),
        ("+bach_size=8", "unknown config key 'bach_size' (did you mean 'batch_size'?)"),
        ("++bach_size=8", "unknown config key 'bach_size'"),
        ("+norm.momentm=0.2", "unknown config key 'norm.momentm'"),
        ("+batch_size=8", "batch_size is already in the config: set it without the +"),
        # a key another option of the group has: which, and what this one takes
        ("+optim.eps=1e-8", "+optim.eps=1e-8: optim=sgd has no eps (adam has it); optim=sgd "
         "takes: momentum, nesterov, weight_decay; a + cannot add a key to it"),
    ],
)  # fmt: skip
def test_a_plus_never_adds_a_key_normbench_does_not_read(override, expected):
    """A typo behind a + would otherwise train at the default under a new run id."""
    with pytest.raises(UserError) as info:
        compose([override])
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "overrides, meant",
    [
        # among the chosen option's own keys (the default config has no norm.groups)
        (["norm=group", "norm.grups=4"], "'norm.groups'"),
        (["norm=group", "+norm.grups=4"], "'norm.groups'"),
        (["norm=group", "norm.group=4"], "'norm.groups'"),
        # the default option has no such key: another option's, named
        (["norm.grups=4"], "'norm.groups'? norm=evonorm_s0 or norm=group have it"),
        (["optim.betaz=1"], "'optim.betas'? optim=adam has it"),
        (["nrom.eps=1"], "'norm.eps'"),  # a misspelt section
        (["optim.lrr=0.1"], "'lr'"),  # a top-level key put under a group
        (["bach_size=8"], "'batch_size'"),
    ],
)
def test_an_unknown_key_suggests_the_nearest_key_beside_it(overrides, meant):
    with pytest.raises(UserError) as info:
        compose(overrides)
    assert f"(did you mean {meant}" in str(info.value)


BN = "(did you mean 'custom_bn' (normbench's BatchNorm) or 'torch_bn' (torch.nn.BatchNorm2d)?)"


@pytest.mark.parametrize(
    "name, meant",
    [
        ("BatchNorm", BN),
        ("batchnorm", BN),
        ("BN", BN),
        ("nn.BatchNorm2d", BN),
        ("LayerNorm", "(did you mean 'layer'?)"),
        ("LN", "(did you mean 'layer'?)"),
        ("GroupNorm", "(did you mean 'group'?)"),
        ("gn", "(did you mean 'group'?)"),
        ("InstanceNorm", "(did you mean 'instance'?)"),
        ("IN", "(did you mean 'instance'?)"),
        ("BRN", "(did you mean 'batch_renorm'?)"),
        ("BatchRenorm", "(did you mean 'batch_renorm'?)"),
        ("custom_bm", "(did you mean 'custom_bn'?)"),  # a typo: by spelling
    ],
)
def test_a_norm_by_its_common_name_is_refused_with_the_options_it_stands_for(name, meant):
    """Hydra's options are file names: an alias is never taken as the option, only said."""
    with pytest.raises(UserError) as info:
        compose([f"norm={name}"])
    message = str(info.value)
    assert message.startswith(f"unknown norm {name!r} {meant}; valid: ")
    assert "\n" not in message and "\n" not in repr(message)


def test_hydra_keys_that_need_a_plus_say_so():
    with pytest.raises(UserError) as info:
        compose(["hydra/launcher=joblib", "hydra.launcher.inner_max_num_threads=1"])
    message = str(info.value)
    key = "hydra.launcher.inner_max_num_threads"
    assert f"{key} is not in Hydra's config (with hydra/launcher=joblib)" in message
    assert "+hydra.launcher.inner_max_num_threads=1" in message
    assert "normbench config" not in message and "did you mean" not in message
    # a misspelled setting it lists: named first (the + alone made it an ignored setting)
    with pytest.raises(UserError, match=r"\(with hydra/launcher=joblib; did you mean "
                       r"hydra\.launcher\.n_jobs\?\); to add a setting"):  # fmt: skip
        compose(["hydra/launcher=joblib", "hydra.launcher.n_jobz=2"])
    # as told: accepted
    compose(["hydra/launcher=joblib", "+hydra.launcher.inner_max_num_threads=1"])
    assert compose(["++batch_size=8"]).batch_size == 8  # ++ on a known key overrides it


OVERRIDE_SETS = [
    [],
    ["norm=group", "norm.groups=4", "batch_size=8"],
    ["experiment=quick", "norm=layer", "batch_size=2", "seed=3"],
    ["experiment=batch_size_study", "dataset=digits", "lr=0.05", "epochs=2"],
    ["model=mlp", "model.hidden=[64]", "norm=batch_renorm", "norm.r_max=2.5"],
    ["~norm.eps", "optim=adam", "optim.betas=[0.8,0.99]", "hydra/launcher=joblib"],
    ["++lr=0.3", "schedule.milestones=[0.25]", "dataset.train_size=100", "name=x"],
    ["norm=batch_renorm", "norm.warmup_steps=100", "eval.precise_bn_batches=50", "batch_size=8"],
]


@pytest.mark.filterwarnings("ignore::normbench.errors.Notice")  # the old key's (said once)
@pytest.mark.parametrize("overrides", OVERRIDE_SETS, ids=lambda o: " ".join(o) or "defaults")
def test_composition_matches_hydras_own(overrides):
    """compose() lets Hydra compose the groups once and applies values itself: the result
    is exactly Hydra's composition of all the overrides, settled as the runner settles a
    sweep's job (the replaced keys translated: validation.settle)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from normbench.options import conf_dir
    from normbench.validation import settle

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        reference = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(reference)
    settle(reference, notify=False)
    assert OmegaConf.to_container(compose(overrides)) == OmegaConf.to_container(reference)


def test_a_key_of_another_option_names_the_option_that_has_it():
    """optim=adam optim.momentum=0.9: say sgd has it and what adam takes, not "did you
    mean 'optim.momentum'?"."""
    with pytest.raises(UserError) as info:
        compose(["optim=adam", "optim.momentum=0.9"])
    message = str(info.value)
    assert message.startswith("optim=adam has no momentum (sgd has it); optim=adam takes: ")
    assert "betas" in message and "did you mean" not in message


def test_a_launcher_that_is_not_installed_names_the_extra(monkeypatch):
    """The joblib launcher's config gone, as without the parallel extra: Hydra's own
    "Could not find" becomes the extra to install; an unknown launcher lists those there."""
    from hydra.core.config_store import ConfigStore

    compose(["hydra/launcher=joblib"])  # the plugin's config is registered on first use
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "joblib.yaml")
    monkeypatch.setattr("normbench.config._composed", {})  # compositions are cached
    with pytest.raises(UserError) as info:
        compose(["hydra/launcher=joblib"])
    assert str(info.value) == (
        "hydra/launcher=joblib is not installed; it comes with normbench's 'parallel' extra: "
        'pip install "normbench[parallel]" (in a clone: pip install -e ".[parallel]")'
    )
    with pytest.raises(UserError) as info:
        compose(["hydra/launcher=nosuch"])
    assert str(info.value).startswith("unknown hydra/launcher=nosuch; available: ")
    assert "basic" in str(info.value) and "submitit_slurm" in str(info.value)


def test_several_values_outside_a_sweep_are_refused():
    for override in ("norm=layer,group", "lr=0.1,0.2", "norm=glob(*_bn)"):
        with pytest.raises(UserError, match="gives several values: that is a sweep"):
            compose([override])


def test_glob_is_written_out_as_hydras_own_glob_expands_it():
    """Against Hydra's own expansion: its parser with a config loader over normbench's
    config folder, as its basic sweeper does."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from normbench.config import expand_globs
    from normbench.options import conf_dir

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    parser = OverridesParser.create(config_loader=loader)
    for glob in ("norm=glob(*_bn)", "norm=glob(*,exclude=[*_bn,none])", "model=glob(*)"):
        (hydras,) = parser.parse_overrides([glob])
        key = glob.split("=", 1)[0]
        assert expand_globs([glob, "lr=0.1"]) == [
            f"{key}={','.join(hydras.sweep_string_iterator())}",
            "lr=0.1",
        ]
    assert expand_globs(["norm=glob(*_bn)"]) == ["norm=custom_bn,ghost_bn,sync_bn,torch_bn"]


@pytest.mark.parametrize(
    "glob, expected",
    [
        ("norm=glob(zz*)", "norm=glob(zz*) matches no norm option; valid: batch_renorm"),
        ("lr=glob(*)", "lr=glob(*): glob() picks among a config group's options"),
    ],
)
def test_a_glob_that_cannot_expand_is_one_error(glob, expected):
    from normbench.config import expand_globs

    with pytest.raises(UserError) as caught:
        expand_globs([glob])
    assert expected in str(caught.value)


def test_a_user_option_shadowing_normbenchs_own_is_ignored_with_a_notice(tmp_path, monkeypatch):
    """Hydra's search path has normbench's folder first: the built-in wins, and the user
    is told which file is ignored."""
    from normbench import config, options
    from normbench.errors import Notice

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "custom_bn.yaml").write_text("name: custom_bn\nmomentum: 0.5\n")
    (tmp_path / "norm" / "mine.yaml").write_text("name: mine\n_target_: torch.nn.LayerNorm\n")
    (tmp_path / "config.yaml").write_text("lr: 0.5\n")
    with pytest.warns(Notice) as notices:
        config.add_config_dir(tmp_path)
    assert [str(n.message) for n in notices] == [
        f"{tmp_path / 'config.yaml'} is ignored: normbench's own config.yaml is the root "
        "config; a folder of yours adds options to the groups (norm/NAME.yaml, ...)",
        f"{tmp_path / 'norm' / 'custom_bn.yaml'} is ignored: normbench's own norm=custom_bn "
        "comes first (Hydra's search path); give yours another name, as norm/my_custom_bn.yaml",
    ]
    # normbench's, as Hydra has them
    assert compose(["norm=custom_bn"]).norm.momentum == 0.1 and compose().lr == 0.1
    assert config.option_file("norm", "custom_bn") == config.conf_dir() / "norm/custom_bn.yaml"
    assert compose(["norm=mine"]).norm._target_ == "torch.nn.LayerNorm"


def test_parsed_overrides_survive_the_cache_emptying_mid_call(monkeypatch):
    """The cache of parsed overrides is emptied when full: the texts a call needs (some
    parsed before, some new) are all answered, however many."""
    from normbench import config

    monkeypatch.setattr(config, "_parsed", {})
    monkeypatch.setattr(config, "_PARSED_MAX", 3)
    config.parse_overrides(["epochs=1", "lr=0.1", "seed=1", "seed=2"])  # past the limit
    texts = ["epochs=1", "seed=3", "lr=0.1", "seed=4", "seed=5", "epochs=1"]
    parsed = config.parse_overrides(texts)
    assert [o.input_line for o in parsed] == texts
    assert set(config._parsed) == {"seed=3", "seed=4", "seed=5"}  # emptied, then filled


@pytest.mark.parametrize("folder", ["cd[/x]", "q'uo,te", "sl\\ash", "sp ace]"])
def test_a_config_folder_with_the_grammars_characters_in_its_name(tmp_path, monkeypatch, folder):
    """Hydra's override grammar reads [ ] ' , \\ in the search path: the folder is quoted."""
    from normbench import config, options

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / folder / "norm").mkdir(parents=True)
    (tmp_path / folder / "norm" / "mine.yaml").write_text(
        "name: mine\n_target_: torch.nn.LayerNorm\n"
    )
    config.add_config_dir(tmp_path / folder)
    assert compose(["norm=mine"]).norm._target_ == "torch.nn.LayerNorm"
    assert config.option_file("norm", "mine") == tmp_path / folder / "norm" / "mine.yaml"


def test_a_config_folder_that_hydra_would_interpolate_or_is_a_file(tmp_path, monkeypatch):
    from normbench import config, options

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / "a${x}").mkdir()
    with pytest.raises(UserError, match=r"reads \$\{...\} in its search path"):
        config.add_config_dir(tmp_path / "a${x}")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="file: not a folder"):
        config.add_config_dir(tmp_path / "file")
    with pytest.raises(UserError, match="nothing: no such folder"):
        config.add_config_dir(tmp_path / "nothing")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: bad\neps: [unclosed\n", "invalid YAML at line 3, column 1: while parsing a flow "
         "sequence; expected ',' or ']', but got '<stream end>'"),
        ("name: !!python/name:os.system\n", "invalid YAML at line 1, column 7: could not "
         "determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'"),
        ("# a comment \x1b]0;x\x07\nname: bad\n", "invalid YAML at character 12: unacceptable "
         "character #x001b: special characters are not allowed"),
        (b"name: caf\xe9\n", "not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"),
    ],
    ids=["syntax", "python tag", "escape byte", "latin-1"],
)  # fmt: skip
def test_a_malformed_option_file_is_one_line_everywhere(tmp_path, monkeypatch, text, expected):
    from typer.testing import CliRunner

    from normbench import options
    from normbench.cli import app

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / "conf" / "norm").mkdir(parents=True)
    path = tmp_path / "conf" / "norm" / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    for command in ("run", "sweep", "config"):
        norms = "norm=layer,bad" if command == "sweep" else "norm=bad"
        result = CliRunner().invoke(
            app, ["--config-dir", str(tmp_path / "conf"), command, norms, f"out_dir={out}"]
        )
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "\x1b" not in result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and f"{path}: {expected}" in line, line
    assert not out.exists()


def test_a_key_below_a_null_is_one_line():
    """hydra.sweeper.params is null unless an experiment preset sweeps."""
    with pytest.raises(UserError) as caught:
        compose(["hydra.sweeper.params.norm=zzz"])
    assert str(caught.value) == (
        "hydra.sweeper.params.norm=zzz: hydra.sweeper.params is null here, so it has no norm "
        "(an experiment preset that sweeps sets it); give the sweep on the command line "
        "instead: norm=zzz"
    )


# ------------------------------------------------ compose_plain: a sweep's plan, cheaper

#: Value overrides on compositions of every kind, good and bad: compose_plain must give
#: compose's values (types and order too) or its message, and the same notices.
PLAIN_CASES = [
    [],
    ["lr=1", "batch_size=16", "seed=3"],  # an int where a float goes: converted
    ["lr=1", "lr=0.5", "lr_scaling=sqrt"],  # the last of one key wins
    ["norm=group", "norm.groups=4", "batch_size=8"],
    ["norm=batch_renorm", "norm.warmup_steps=100", "eval.precise_bn_batches=50", "batch_size=8"],
    ["norm=batch_renorm", "norm.warmup_fraction=0.7", "norm.ramp_fraction=0.6"],
    ["experiment=quick", "norm=layer", "lr=0.05", "seed=2"],
    ["experiment=batch_size_study", "dataset=digits", "epochs=2"],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lr=0.3"],
    ["model=mlp", "model.hidden=[64]", "optim=adam", "optim.betas=[0.8,0.99]"],  # lists
    ["~norm.eps", "lr=0.2"],
    ["++lr=0.3", "+norm.momentum=0.2"],
    ["eval_batch_size=${batch_size}", "batch_size=64"],  # an interpolation
    ["name=exp", "out_dir=/tmp/elsewhere", "dataset.root=data2", "threads=2"],
    ["report.baseline=layer", "report.stale_threshold=3"],
    ["checkpoint.keep=true", "eval.bn_stats=false", "max_steps=10", "budget=steps"],
    # bad values: the first one's message, in compose's order
    ["lr=-1"],
    ["lr=abc"],
    ["batch_size=0", "epochs=-1"],
    ["epochs=2.5"],
    ["norm=group", "norm.groups=0"],
    ["norm=group", "norm.groups=abc"],
    ["norm=group", "norm.grups=4"],
    ["norm.name=layer"],
    ["name=a/b"],
    ["name=.."],
    ["lr=1e38", "lr_scaling=linear", "batch_size=4096"],
    ["schedule.name=step", "schedule.gamma=1e30", "lr=1"],
    ["optim=adam", "optim.betas=[0.99999999,0.9]", "lr=1e35"],
    ["memory_format=sideways"],
    ["budget=forever"],
    [f"out_dir={'x' * 300}"],
    ["report.select=lr"],
    ["checkpoint.save=sometimes", "lr=-1"],
]


def _outcome(make, overrides):
    """Every key's (name, type, value), or the message; and the notices."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = [(k, type(v), v) for k, v in flatten(make(overrides)).items()]
        except UserError as err:
            result = f"error: {err}"
    return result, [str(w.message) for w in caught]


def _same_as_compose(cases):
    from normbench.config import compose_plain

    for overrides in cases:
        for _ in range(2):  # the second time from what the first left cached
            assert _outcome(compose_plain, overrides) == _outcome(compose, overrides), overrides


def test_compose_plain_gives_composes_values_and_messages():
    assert any(isinstance(_outcome(compose, o)[0], str) for o in PLAIN_CASES)
    _same_as_compose(PLAIN_CASES)
    # one composition's jobs in any order: what one job's values left behind changes none
    _same_as_compose([["lr=abc"], ["lr=0.3"], ["lr=2"], ["batch_size=3", "lr=abc"], ["lr=2"]])


def test_compose_plain_of_a_users_options_and_an_installed_one(tmp_path, monkeypatch):
    """Options of a user's folder (keys of their own, checked by their defaults' types, an
    interpolation) and of an installed package (its constructor's defaults)."""
    from normbench import config, options
    from normbench.norms import registry

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / "conf" / "norm").mkdir(parents=True)
    (tmp_path / "conf" / "norm" / "mine.yaml").write_text(
        "name: mine\n_target_: torch.nn.LayerNorm\nscale: 2.0\nflag: true\nlabel: x\n"
    )
    (tmp_path / "conf" / "norm" / "linked.yaml").write_text(
        "name: linked\n_target_: torch.nn.LayerNorm\nwidth: ${batch_size}\n"
    )
    config.add_config_dir(tmp_path / "conf")
    site = tmp_path / "site"
    (site / "plain_norms-0.1.dist-info").mkdir(parents=True)
    (site / "plain_norms-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: plain-norms\nVersion: 0.1\n"
    )
    (site / "plain_norms-0.1.dist-info" / "entry_points.txt").write_text(
        "[normbench.norms]\nshifted = plain_norms:Shifted\n"
    )
    (site / "plain_norms.py").write_text(
        '"""A variant without torch."""\n\n\nclass Shifted:\n'
        "    def __init__(self, num_channels, eps=1e-5, shift=2, center=True):\n"
        "        self.shift = shift\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_stored", {})
    assert "shifted" in registry.entry_point_norms()
    cases = [
        ["norm=mine", "norm.scale=3", "norm.flag=false", "norm.label=y", "lr=0.2"],
        ["norm=mine", "norm.scale=abc"],
        ["norm=mine", "norm.flag=2"],
        ["norm=mine", "norm.label=3"],
        ["norm=linked", "batch_size=16"],
        ["norm=shifted", "norm.shift=5", "norm.eps=0.001", "seed=4"],
        ["norm=shifted", "norm.shift=x"],
        ["norm=shifted", "norm.center=1"],
        ["norm=shifted", "norm.missing=1"],
    ]
    _same_as_compose(cases)
