"""The README's "Your own data, end to end" commands stay valid without running them
(they take minutes): each `python -m launch.NAME` names an entry point, each of its
flags is one of that entry point's (docs/FLAGS.md, which test_flags_doc keeps equal
to the flag definitions), each `--config.KEY=VALUE` is a key of the config file the
command names with a value of the key's type, each path a step reads (facets, ranker,
artifact) is one an earlier step writes, and the Python client compiles and calls
functions the serving package has."""

import ast
import importlib
import shlex

import pytest

from launch import flags_doc

SECTION = "## Your own data, end to end\n"
COMMON = "launch.common (multi-host flags, shared)"
# What a step writes, below which of its flags (docs: the entry points' help).
WRITES = {"pretrain_contrastive": ("workdir", "facet_cl"), "pretrain_kg": ("workdir", "facet_kg"),
          "train_ranker": ("workdir", "ranker"), "export_int4": ("out", "")}
READS = ("config.facet_paths.", "ranker", "artifact")


def _section() -> str:
    text = (flags_doc.REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "README lost its section " + SECTION.strip()
    return text.split(SECTION)[1].split("\n## ")[0]


def _shell(section: str) -> tuple[list[list[str]], list[str]]:
    """The `python -m launch.*` commands of the section's bash blocks (split as the
    shell splits them, a trailing `&` dropped) and the bodies of its `python -` heredocs."""
    commands, heredocs, line_so_far, end = [], [], "", None
    for block in section.split("```bash\n")[1:]:
        for line in block.split("\n```")[0].splitlines():
            if end is not None:  # inside a heredoc
                if line == end:
                    end = None
                else:
                    heredocs[-1].append(line)
                continue
            line_so_far += line
            if line_so_far.endswith("\\"):
                line_so_far = line_so_far[:-1]
                continue
            words, line_so_far = shlex.split(line_so_far, comments=True), ""
            if words[:2] == ["python", "-"] and words[2].startswith("<<"):
                end = words[2][2:]  # shlex took its quotes off
                heredocs.append([])
            elif words[:2] == ["python", "-m"]:
                commands.append([w for w in words if w != "&"])
    return commands, ["\n".join(h) for h in heredocs]


def _config_value_ok(config, key: str, value: str) -> str | None:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return f"no config key {key!r}"
        node = node[part]
    kind = type(node)
    try:
        ok = value.lower() in ("true", "false") if kind is bool else (
            kind(value) is not None if kind in (int, float) else True)
    except ValueError:
        ok = False
    return None if ok else f"{key}={value!r}: not of type {kind.__name__}"


def check_commands(commands: list[list[str]], flag_names: dict[str, list[str]]) -> list[str]:
    """Every problem of `commands` (empty: none), in order."""
    problems, written = [], []
    common = flag_names.get(COMMON, [])
    for words in commands:
        module = words[2]
        name = module.removeprefix("launch.")
        if name not in flag_names:
            problems.append(f"{module}: no such entry point")
            continue
        known = set()
        for f in flag_names[name] + common:
            known |= {f"--{f[7:]}", f"--no{f[7:]}"} if f.startswith("--[no]") else {f}
        flags, config = {}, None
        for w in words[3:]:
            flag, _, value = w.partition("=")
            flags[flag[2:]] = value
            if flag.startswith("--config."):
                continue
            if flag not in known:
                problems.append(f"{module}: unknown flag {flag}")
            elif flag == "--config":
                path, _, arg = value.partition(":")
                mod = path.removesuffix(".py").replace("/", ".")
                config = importlib.import_module(mod).get_config(arg or None)
        for key, value in flags.items():
            if key.startswith("config."):
                why = ("no --config" if config is None
                       else _config_value_ok(config, key.removeprefix("config."), value))
                if why:
                    problems.append(f"{module}: {why}")
            if key.startswith(READS) and value not in written:
                problems.append(f"{module}: --{key}={value} is written by no earlier step "
                                f"(they write {written})")
        if name in WRITES:
            flag, below = WRITES[name]
            written.append(f"{flags.get(flag)}/{below}".rstrip("/"))
    return problems


def test_own_data_commands_are_valid():
    commands, heredocs = _shell(_section())
    names = [w[2] for w in commands]
    assert names[:4] == ["launch.pretrain_contrastive", "launch.pretrain_kg",
                         "launch.train_ranker", "launch.export_int4"]
    assert {"launch.serve_embeddings", "launch.serve_ranker"} <= set(names)
    flag_names = flags_doc.flag_names(flags_doc.OUT.read_text(encoding="utf-8"))
    assert check_commands(commands, flag_names) == []
    # The client: it compiles, and what it calls of the serving package exists.
    (client,) = heredocs
    tree = ast.parse(client)
    modules = {"ranker_service": importlib.import_module("serving.ranker_service"),
               "embedding_pb2_grpc": importlib.import_module("serving.protos.embedding_pb2_grpc")}
    used = {(n.value.id, n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in modules}
    assert {("ranker_service", "rank_request"), ("ranker_service", "decode_response")} <= used
    assert [u for u in used if not hasattr(modules[u[0]], u[1])] == []


@pytest.mark.parametrize("change, problem", [
    (("--config.data.user_column=uid", "--config.data.user_col=uid"),
     "launch.pretrain_contrastive: no config key 'data.user_col'"),
    (("--auc_noise_z=2", "--noise_z=2"), "launch.export_int4: unknown flag --noise_z"),
    (("--config.facet_paths.kg=runs/mine/kg/facet_kg", "--config.facet_paths.kg=runs/kg"),
     "launch.train_ranker: --config.facet_paths.kg=runs/kg is written by no earlier step"),
    (("--config.train.batch_size=512", "--config.train.batch_size=big"),
     "launch.train_ranker: train.batch_size='big': not of type int"),
])
def test_check_commands_finds_what_went_stale(change, problem):
    flag_names = flags_doc.flag_names(flags_doc.OUT.read_text(encoding="utf-8"))
    commands = [
        shlex.split("python -m launch.pretrain_contrastive --config=configs/contrastive.py:smoke "
                    "--workdir=runs/mine/cl --config.data.user_column=uid"),
        shlex.split("python -m launch.pretrain_kg --config=configs/kg.py --workdir=runs/mine/kg"),
        shlex.split("python -m launch.train_ranker --config=configs/ranker.py "
                    "--workdir=runs/mine/ranker --config.train.batch_size=512 "
                    "--config.facet_paths.kg=runs/mine/kg/facet_kg"),
        shlex.split("python -m launch.export_int4 --ranker=runs/mine/ranker/ranker "
                    "--out=runs/mine/artifact --auc_noise_z=2"),
    ]
    assert check_commands(commands, flag_names) == []
    commands = [[change[1] if w == change[0] else w for w in c] for c in commands]
    (found,) = check_commands(commands, flag_names)
    assert found.startswith(problem), found
