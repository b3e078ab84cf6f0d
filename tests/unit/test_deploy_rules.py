"""deploy/: the Prometheus rules and alerts (promtool checks them and runs their unit tests) and
the Grafana dashboard (its structure; every metric and label it or a rule names is one the
gateway declares, every query and alert reads at least one of them, and every metric declared
has a panel: read from the real registry, not a copy of the list)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.observability.exposition import Registry
from gateway.observability.instruments import Histogram
from gateway.observability.metrics import GatewayMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULE_FILES = sorted(p for p in PROMETHEUS.glob("*.yml") if not p.name.endswith("_test.yml"))
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "gateway-dashboard.json"

#: labels Prometheus adds to every scraped series
TARGET_LABELS = frozenset({"job", "instance"})

#: what every name the gateway declares begins with: the checker reads names with these prefixes
#: as the gateway's (process_* are the standard names every client library exports)
PREFIXES = ("gateway_", "process_")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make test-deps` installs it (Debian package"
            " prometheus), or apt-get install prometheus"
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


# -- what the gateway declares -----------------------------------------------------------------


def declared_series() -> dict[str, frozenset[str]]:
    """Every series name the gateway exposes -> its label names, from GatewayMetrics itself:
    a histogram family is its _bucket (with le), _sum and _count series."""
    registry = Registry()
    GatewayMetrics(registry)
    series: dict[str, frozenset[str]] = {}
    for name, family in registry.families.items():
        labels = frozenset(family.label_names)
        if isinstance(family, Histogram):
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


# -- a small PromQL reader: enough to find metric names, matchers and grouping labels -----------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_METRIC = re.compile(r"(?<![\w:$])(?:gateway|process)_[A-Za-z0-9_]+(?![\w:(])")
_RECORDED = re.compile(r"(?<![\w:$])[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(?<![\w:$])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
_CREATES_LABEL = re.compile(r"\b(?:label_replace|label_join)\s*\(")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(.+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis group opening at text[start] == "("."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _split_args(inner: str) -> list[str]:
    """Top-level comma-separated arguments of a call's inside."""
    args: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in inner:
        if ch == "," and depth == 0:
            args.append("".join(current))
            current = []
            continue
        depth += ch == "("
        depth -= ch == ")"
        current.append(ch)
    args.append("".join(current))
    return [a.strip() for a in args]


@dataclass(frozen=True)
class Expression:
    where: str
    text: str


def check_expression(
    expr: Expression, series: dict[str, frozenset[str]], recorded: frozenset[str]
) -> list[str]:
    """Problems with one PromQL expression: metrics the gateway does not declare, recording rules
    nobody defines, matcher or by/without labels the metric does not have."""
    problems: list[str] = []
    where = expr.where
    values = label_values_call(expr.text)
    if values is not None:
        # a Grafana variable: label_values(metric, label) asks `label` of `metric`
        metric, label = values
        text = f"group by ({label}) ({metric})"
    else:
        text = expr.text
    # string contents become their index ("0", "1"...): no name inside one is read as a metric,
    # yet label_replace's destination label can still be looked up
    strings: list[str] = []

    def keep(match: re.Match[str]) -> str:
        strings.append(match.group(0)[1:-1])
        return f'"{len(strings) - 1}"'

    text = _RANGE.sub("", _STRING.sub(keep, text))

    for name in _METRIC.findall(text):
        if name not in series:
            problems.append(f"{where}: {name} is not a metric the gateway declares")
    for name in _RECORDED.findall(text):
        if name not in recorded:
            problems.append(f"{where}: recording rule {name} is not defined")
    for name, matchers in _SELECTOR.findall(text):
        labels = series.get(name)
        if labels is None:
            continue  # reported above, or a recording rule
        for label in _MATCHER.findall(matchers):
            if label not in labels | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
    for grouping in _GROUPING.finditer(text):
        names = [n.strip() for n in grouping.group(2).split(",") if n.strip()]
        after = grouping.end()
        while after < len(text) and text[after].isspace():
            after += 1
        if after < len(text) and text[after] == "(":
            scope = text[after : _balanced(text, after)]
        else:  # sum (x) by (labels): the group before the clause
            end = grouping.start()
            while end > 0 and text[end - 1].isspace():
                end -= 1
            start = end - 1
            depth = 0
            while start >= 0:
                depth += (text[start] == ")") - (text[start] == "(")
                if depth == 0:
                    break
                start -= 1
            scope = text[start:end]
        created = set()
        for call in _CREATES_LABEL.finditer(scope):
            open_at = call.end() - 1
            args = _split_args(scope[open_at + 1 : _balanced(scope, open_at) - 1])
            if len(args) > 1 and re.fullmatch(r'"\d+"', args[1]):
                created.add(strings[int(args[1][1:-1])])
        for metric in set(_METRIC.findall(scope)) & series.keys():
            for label in names:
                if label not in series[metric] | TARGET_LABELS | created:
                    problems.append(
                        f"{where}: {grouping.group(1)} ({label}) but {metric} has no such label"
                    )
    return problems


def reads_the_gateway(
    expr: Expression, series: dict[str, frozenset[str]], recorded: frozenset[str]
) -> list[str]:
    """A problem if the expression names no metric the gateway declares and no recording rule:
    then it reads nothing of the gateway's (a misspelt prefix, another job's metric, a constant).
    """
    text = _RANGE.sub("", _STRING.sub('""', expr.text))
    if set(_METRIC.findall(text)) & series.keys() or set(_RECORDED.findall(text)) & recorded:
        return []
    return [f"{expr.where}: names no metric the gateway declares and no recording rule"]


def label_values_call(text: str) -> tuple[str, str] | None:
    match = _LABEL_VALUES.match(text)
    return None if match is None else (match.group(1), match.group(2))


# -- the files ---------------------------------------------------------------------------------


def load_rules() -> list[tuple[Path, dict[str, Any]]]:
    """(file, rule) for every rule of every rule file."""
    rules: list[tuple[Path, dict[str, Any]]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend((path, rule) for rule in group["rules"])
    return rules


def rule_expressions(rules: list[tuple[Path, dict[str, Any]]]) -> list[Expression]:
    return [
        Expression(f"{path.name}: {rule.get('alert') or rule['record']}", rule["expr"])
        for path, rule in rules
    ]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The panels that query (rows only group them), rows' collapsed panels included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_expressions(dashboard: dict[str, Any]) -> list[Expression]:
    found = []
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            found.append(Expression(f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(Expression(f"variable {variable['name']}", variable["definition"]))
            found.append(Expression(f"variable {variable['name']}", variable["query"]["query"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found.append(Expression(f"annotation {annotation['name']!r}", annotation["expr"]))
    return found


def recorded_names(rules: list[tuple[Path, dict[str, Any]]]) -> frozenset[str]:
    return frozenset(rule["record"] for _, rule in rules if "record" in rule)


def all_problems(dashboard: dict[str, Any]) -> list[str]:
    series = declared_series()
    rules = load_rules()
    recorded = recorded_names(rules)
    problems = []
    for expr in [*rule_expressions(rules), *dashboard_expressions(dashboard)]:
        problems.extend(check_expression(expr, series, recorded))
    # a recording rule may be a constant (the SLO target); a panel, variable, annotation or
    # alert must read something the gateway exports
    alerts = [(path, rule) for path, rule in rules if "alert" in rule]
    for expr in [*rule_expressions(alerts), *dashboard_expressions(dashboard)]:
        problems.extend(reads_the_gateway(expr, series, recorded))
    return problems


# -- promtool ----------------------------------------------------------------------------------


def test_rule_files_pass_promtool_check() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "rules.yml"]
    result = run_promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {rule["alert"] for _, rule in load_rules() if "alert" in rule}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fired == set()
    assert alerts - quiet == set()
    assert (fired | quiet) - alerts == set()


def test_dashboard_expressions_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each panel query, with Grafana's variables given values."""
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$route": ".*"}
    substitutions["$upstream"] = ".*"
    rules = []
    for i, expr in enumerate(dashboard_expressions(load_dashboard())):
        if label_values_call(expr.text) is not None:
            continue
        text = expr.text
        for variable, value in substitutions.items():
            text = text.replace(variable, value)
        assert "$" not in text.replace("${1}", ""), f"{expr.where}: unknown variable in {text}"
        rules.append({"record": f"dashboard:query:{i}", "expr": text})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_loads_the_rules(tmp_path: Path) -> None:
    """docker-compose.yml mounts deploy/prometheus where config/prometheus.yml's rule_files look,
    and that config (its rule files read from here) passes promtool check config."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config = yaml.safe_load((REPO / "config" / "prometheus.yml").read_text())
    host_paths = []
    for rule_file in config["rule_files"]:
        container_dir, name = rule_file.rsplit("/", 1)
        host_dir = next(h for h, c in mounts.items() if c == container_dir)
        host_paths.append((REPO / host_dir / name).resolve())
    assert sorted(host_paths) == RULE_FILES
    config["rule_files"] = [str(p) for p in host_paths]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the rules ---------------------------------------------------------------------------------


def test_alerts_have_a_wait_severity_and_annotations() -> None:
    alerts = [rule for _, rule in load_rules() if "alert" in rule]
    assert len(alerts) >= 9
    for alert in alerts:
        assert alert["for"], alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys()


def test_the_slo_target_is_defined_once_and_used_by_every_burn_rate_alert() -> None:
    rules = load_rules()
    targets = [rule for _, rule in rules if rule.get("record") == "gateway:slo_availability:target"]
    assert len(targets) == 1
    assert targets[0]["expr"].strip() == "vector(0.999)"
    burn = [rule for _, rule in rules if "ErrorBudgetBurn" in rule.get("alert", "")]
    assert len(burn) == 3
    for rule in burn:
        assert rule["expr"].count("gateway:slo_availability:target") == 2
        assert "0.999" not in rule["expr"]
        assert "0.001" not in rule["expr"]


def test_rules_and_dashboard_use_only_declared_metrics_and_labels() -> None:
    assert all_problems(load_dashboard()) == []


def test_declared_series_come_from_the_registry() -> None:
    series = declared_series()
    assert series["gateway_requests_total"] == {"route", "method", "code"}
    assert series["gateway_request_duration_seconds_bucket"] == {"route", "le"}
    assert series["gateway_requests_in_flight"] == frozenset()
    assert series["process_open_fds"] == frozenset()
    assert "gateway_request_duration_seconds" not in series


def test_the_checker_reads_every_declared_name() -> None:
    """A metric declared under another prefix would go unchecked: add the prefix to PREFIXES and
    _METRIC."""
    for name in declared_series():
        assert name.startswith(PREFIXES), name
        assert _METRIC.fullmatch(name), name


# -- the checker can fail ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(gateway_requests_totals[5m])", "gateway_requests_totals is not a metric"),
        ("rate(gateway_request_duration_seconds[5m])", "gateway_request_duration_seconds is not"),
        ("gateway_requests_in_flight_bucket", "gateway_requests_in_flight_bucket is not"),
        ('gateway_requests_total{status="500"}', "gateway_requests_total has no label 'status'"),
        ("sum by (upstream) (rate(gateway_requests_total[5m]))", "by (upstream) but"),
        ("sum without (le) (gateway_requests_total)", "without (le) but"),
        ("sum (gateway_connections_active) by (route)", "by (route) but"),
        ("job_route:gateway_nothing:ratio_rate5m > 0", "recording rule job_route:gateway_not"),
        ("label_values(gateway_requests_total, upstream)", "by (upstream) but"),
        ("label_values(gateway_request_count, route)", "gateway_request_count is not"),
        ("rate(process_cpu_second_total[5m])", "process_cpu_second_total is not a metric"),
        ("sum by (route) (process_open_fds)", "by (route) but"),
    ],
)
def test_checker_reports_unknown_names_and_labels(expr: str, problem: str) -> None:
    problems = check_expression(Expression("fake", expr), declared_series(), frozenset())
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (job, route) (rate(gateway_requests_total{code=~"5..",route="gateway_x"}[5m]))',
        "histogram_quantile(0.9, sum by (le) (rate(gateway_request_duration_seconds_bucket[1m])))",
        'sum by (c) (label_replace(gateway_requests_total, "c", "${1}", "code", "(.)"))',
        "gateway_tls_certificate_not_after_seconds - time() < 14 * 86400",
        "label_values(gateway_upstream_endpoint_up, endpoint)",
        "sum by (instance) (process_open_fds and on (job, instance) gateway_build_info)",
    ],
)
def test_checker_accepts_what_the_gateway_declares(expr: str) -> None:
    assert check_expression(Expression("fake", expr), declared_series(), frozenset()) == []


def test_a_dashboard_panel_with_an_unknown_metric_is_reported() -> None:
    dashboard = load_dashboard()
    bad = copy.deepcopy(next(query_panels(dashboard)))
    bad["title"] = "Made up"
    bad["targets"][0]["expr"] = "sum(rate(gateway_made_up_total[5m]))"
    dashboard["panels"].append(bad)
    assert all_problems(dashboard) == [
        "panel 'Made up' A: gateway_made_up_total is not a metric the gateway declares",
        "panel 'Made up' A: names no metric the gateway declares and no recording rule",
    ]


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(gatway_requests_total[5m]))",  # misspelt: the name checks never see it
        "sum by (instance) (rate(process_cpu_seconds[5m]))",
        "sum(up)",  # another job's metric
        "vector(1)",
        'sum(rate(other_total{route="gateway_requests_total"}[5m]))',  # only in a string
    ],
)
def test_a_dashboard_panel_reading_nothing_of_the_gateway_is_reported(expr: str) -> None:
    dashboard = load_dashboard()
    bad = copy.deepcopy(next(query_panels(dashboard)))
    bad["title"] = "Reads nothing"
    bad["targets"][0]["expr"] = expr
    dashboard["panels"].append(bad)
    problem = "panel 'Reads nothing' A: names no metric the gateway declares and no recording rule"
    assert problem in all_problems(dashboard)


# -- the dashboard -----------------------------------------------------------------------------


def test_dashboard_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "upstream"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        # label_values(<a gateway metric>, <the label>): the checker checks the pair
        values = label_values_call(variable["definition"])
        assert values is not None
        assert values == label_values_call(variable["query"]["query"])
        assert values[0].startswith("gateway_")
        assert values[1] == name
        assert variable["includeAll"]
        assert variable["multi"]
        assert variable["allValue"] == ".*"


def test_dashboard_panels_have_unique_ids_a_datasource_and_queries() -> None:
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids))
    panels = list(query_panels(dashboard))
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_what_an_operator_looks_for() -> None:
    """Each metric the brief's panels are about is queried by some panel."""
    used = " ".join(e.text for e in dashboard_expressions(load_dashboard()))
    for metric in [
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_request_duration_seconds_bucket",
        "gateway_requests_in_flight",
        "gateway_connections_active",
        "gateway_connections_refused_total",
        "gateway_upstream_endpoint_up",
        "gateway_circuit_breaker_state",
        "gateway_circuit_breaker_transitions_total",
        "gateway_rate_limited_total",
        "gateway_rate_limit_store_errors_total",
        "gateway_retries_total",
        "gateway_retry_budget_exhausted_total",
        "gateway_idempotency_total",
        "gateway_jwt_total",
        "gateway_config_reloads_total",
        "gateway_config_last_reload_success",
        "gateway_tls_certificate_not_after_seconds",
    ]:
        assert re.search(rf"\b{metric}\b", used), metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, route)" in used


def test_dashboard_shows_every_declared_metric() -> None:
    """Every metric family in the registry is read by some panel, variable or annotation, so a
    metric added to observability/metrics.py without a panel is noticed (a histogram by any of
    its series)."""
    used = set()
    for expr in dashboard_expressions(load_dashboard()):
        used |= set(_METRIC.findall(_STRING.sub('""', expr.text)))
    registry = Registry()
    GatewayMetrics(registry)
    missing = []
    for name, family in registry.families.items():
        names = {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if not (names if isinstance(family, Histogram) else {name}) & used:
            missing.append(name)
    assert missing == []
