"""Configuration: a TOML file, overridden key by key by `GPUWARDEN_<SECTION>__<KEY>`.

Every key is documented in `config.example.toml`. Unknown keys are errors, so a typo
cannot silently disable a threshold. `load_config` returns a validated `Config` or
raises `ConfigError` listing every problem by its key path.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import copy
import difflib
import ipaddress
import os
import re
import shutil
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .config_file import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET,
    config_path,
    parse_duration,
    read_toml,
)
from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "IDLE_MODE",
    "Config",
    "ModeConfig",
    "WorkloadConfig",
    "config_path",
    "config_warnings",
    "load_config",
    "parse_duration",
    "process_runner",
]

IDLE_MODE = "idle"

# Directory that relative `*_file` secrets resolve against while a config loads:
# $CREDENTIALS_DIRECTORY under systemd (LoadCredential=), else the config file's folder.
_secret_base: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "_secret_base", default=None
)

# Every time accepts a number of seconds or a duration ("2s", "45m", "1h30m").
Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
PositiveSeconds = Duration
NonNegativeSeconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


def _credential_path(path: Path) -> Path:
    """Where a relative secret file is: $CREDENTIALS_DIRECTORY, else the config's folder."""
    base = _secret_base.get()
    if not path.is_absolute():
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            return Path(creds) / path
        if base is not None:
            return base / path
    return path


def _read_secret(path: Path, key: str) -> SecretStr:
    relative = not path.is_absolute()
    path = _credential_path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        hint = ""
        if relative and not os.environ.get("CREDENTIALS_DIRECTORY"):
            # The service reads it from its credentials; outside systemd, say how to
            # check it the same way.
            hint = (" (relative secrets are read from $CREDENTIALS_DIRECTORY under "
                    "systemd: to check as the service does, run as root with "
                    "CREDENTIALS_DIRECTORY=/etc/gpuwarden/credentials)")
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror or exc}{hint}") from exc
    if not text:
        raise ValueError(f"{key}: {path} is empty")
    return SecretStr(text)


def _resolve_secret(
    model: BaseModel, value_field: str, file_field: str
) -> None:
    value = getattr(model, value_field)
    file = getattr(model, file_field)
    if value is not None and file is not None:
        raise ValueError(f"set {value_field} or {file_field}, not both")
    if file is not None:
        object.__setattr__(model, value_field, _read_secret(file, file_field))
    elif value is not None and not value.get_secret_value().strip():
        # An empty secret is not "no secret": it would be configured, and match.
        raise ValueError(f"{value_field}: empty (an empty secret would match; remove "
                         "the setting to turn it off)")


def _check_whsec(secret: SecretStr | None, key: str) -> None:
    """A Standard Webhooks secret: whsec_ + base64 of at least 24 bytes."""
    if secret is None:
        return
    if not secret.get_secret_value().startswith("whsec_"):
        raise ValueError(f"{key}: not whsec_<base64> (make one with: gpuwarden secret "
                         "whsec; the value is not shown)")
    text = secret.get_secret_value().removeprefix("whsec_")
    # Strictly one base64 word: a file holding more (a label, a second line) would
    # otherwise decode to some other key and sign with it.
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", text):
        raise ValueError(f"{key}: not whsec_<base64> (one line, nothing else; the value "
                         "is not shown)")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{key}: not base64 (expected whsec_<base64>)") from exc
    if len(raw) < 24:
        raise ValueError(f"{key}: too short ({len(raw)} bytes; at least 24)")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Section):
    sample_interval: PositiveSeconds = 1.0
    state_dir: Path = Path("/var/lib/gpuwarden")
    socket: Path = Path(DEFAULT_SOCKET)
    socket_group: str | None = "gpuwarden"
    default_mode: str = IDLE_MODE
    roll_back_failed_start: bool = True
    # How process workloads run: "systemd" as transient units (outside gpuwarden's
    # sandbox), "child" as the daemon's children; "auto" picks systemd when the daemon
    # itself runs as a systemd service.
    process_runner: Literal["auto", "systemd", "child"] = "auto"


class DockerConfig(_Section):
    host: str | None = None
    timeout: PositiveSeconds = 30.0

    def resolved_host(self) -> str:
        return self.host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class SimConfig(_Section):
    total_mib: int = Field(20480, gt=0)
    count: int = Field(1, ge=1, le=16)
    ledger_dir: Path = Path("/run/gpuwarden/sim")
    release_delay: NonNegativeSeconds = 0.15
    name: str = "gpuwarden simulated GPU"


class GpuConfig(_Section):
    backend: Literal["nvml", "sim"] = "nvml"
    sim: SimConfig = SimConfig()


class ThresholdsConfig(_Section):
    warn: float = Field(0.80, gt=0, le=1)
    alert: float = Field(0.90, gt=0, le=1)
    critical: float = Field(0.95, gt=0, le=1)
    clear_margin: float = Field(0.05, ge=0, lt=1)
    sustain: int = Field(2, ge=1, le=3600)


class ReleaseConfig(_Section):
    timeout: PositiveSeconds = 60.0
    poll_interval: PositiveSeconds = 0.1
    tolerance_mib: int = Field(256, ge=0)
    queue_timeout: PositiveSeconds = 5.0


class CrashloopConfig(_Section):
    max_restarts: int = Field(3, ge=1)
    window: PositiveSeconds = 300.0


ProtectAction = Literal["ollama_unload", "comfyui_free", "stop_lowest_priority"]


class WatchdogConfig(_Section):
    # GPU processes no workload owns that are expected (by command name, /proc/PID/comm).
    allowed_processes: list[str] = []
    # How often an unresolved leak is reported again.
    leak_reminder: Duration = 1800.0
    # Taken in order, once per escalation to critical.
    protect_actions: list[ProtectAction] = ["ollama_unload", "comfyui_free"]
    # Seconds each protective action is given to show its effect in VRAM.
    protect_settle: PositiveSeconds = 5.0
    # How often an unresolved alert or critical tier is sent again.
    tier_reminder: Duration = 1800.0


_RESTART_POLICY = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")


def _check_restart_policy(value: object) -> object:
    if isinstance(value, str) and not _RESTART_POLICY.match(value):
        raise ValueError(
            f"not a Docker restart policy: {value!r} "
            "(use no, always, unless-stopped or on-failure[:N])"
        )
    return value


def _check_allowed_host(value: object) -> object:
    from .proxy.browser import split_host

    if isinstance(value, str):
        bare = value[2:] if value.startswith("*.") else value
        found = split_host(bare)
        if found is None or found[1] is not None or not bare or "*" in bare:
            raise ValueError(f"not a host name: {value!r} (a name or address without port "
                             "or scheme, e.g. host.docker.internal or *.lan)")
    return value


def _check_origin(value: object) -> object:
    from .proxy.browser import normalize_origin

    if isinstance(value, str) and normalize_origin(value) is None:
        raise ValueError(f"not an origin: {value!r} (scheme://host[:port], e.g. "
                         "http://192.168.1.20:3000)")
    return value


_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service")


class WorkloadConfig(_Section):
    kind: Literal["docker", "process", "systemd"]
    container: str | None = None
    unit: str | None = None
    command: list[str] | None = None
    cwd: Path | None = None
    env: dict[str, str] = {}
    # The user a process workload runs as (default: gpuwarden's own user).
    user: str | None = None
    release: Literal["ollama", "comfyui", "openai", "none"] = "none"
    url: str | None = None
    # The model ids it serves (release "openai" or "ollama"), as the model router
    # matches a request's "model".
    models: list[str] = []
    stop_timeout: NonNegativeSeconds = 30.0
    ready_timeout: PositiveSeconds = 120.0
    restart_policy: Annotated[str, BeforeValidator(_check_restart_policy)] = "no"
    priority: int = 0
    expected_mib: int | None = Field(None, ge=0)
    # Per-workload overrides of [crashloop].
    crashloop_max_restarts: int | None = Field(None, ge=1)
    crashloop_window: PositiveSeconds | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> WorkloadConfig:
        if self.kind == "docker" and not self.container:
            raise ValueError("kind = 'docker' needs container = '<name>'")
        if self.kind == "process" and not self.command:
            raise ValueError("kind = 'process' needs command = ['argv0', ...]")
        if self.kind == "systemd":
            if not self.unit:
                raise ValueError("kind = 'systemd' needs unit = '<name>.service'")
            if not _UNIT_NAME.fullmatch(self.unit):
                raise ValueError(f"unit = {self.unit!r} is not a service unit's name "
                                 "(like 'ollama.service')")
        if self.user is not None and self.kind != "process":
            raise ValueError("user applies to kind = 'process' only (a unit names its "
                             "own User=, a container its own user)")
        if self.release != "none" and not self.url:
            raise ValueError(f"release = {self.release!r} needs url = 'http://host:port'")
        if self.models and self.release not in ("openai", "ollama"):
            raise ValueError("models: names what an OpenAI-compatible engine (release = "
                             "\"openai\") or Ollama (release = \"ollama\") serves")
        if len(set(self.models)) != len(self.models) or not all(self.models):
            raise ValueError("models: each id once, none empty")
        return self


class ModeConfig(_Section):
    workloads: list[str] = []
    gpu: int = Field(0, ge=0)
    lease: Duration | None = None


_IDLE = ModeConfig()


MIN_TOKEN_LENGTH = 32
_TOKEN_HINT = "generate one with: gpuwarden secret token"


class TokenConfig(_Section):
    token: SecretStr | None = None
    token_file: Path | None = None
    # Requests with this token must also carry a valid signature ([api] signing_secret).
    require_signature: bool = False
    # Kinds of user this token may act for: with X-Gpuwarden-On-Behalf-Of: discord:ID a
    # request is audited as "discord:ID via api:NAME" (a fleet's Discord bot).
    act_for: list[Literal["discord"]] = []

    @model_validator(mode="after")
    def _secret(self) -> TokenConfig:
        _resolve_secret(self, "token", "token_file")
        if self.token is None:
            raise ValueError(f"token: needs token or token_file ({_TOKEN_HINT})")
        text = self.token.get_secret_value()
        # Visible ASCII only: the presented token is compared byte for byte, so a space
        # or a non-ASCII character would be a token no HTTP client sends as configured.
        if not re.fullmatch(r"[\x21-\x7e]+", text):
            raise ValueError("token: only visible ASCII characters, no spaces (the value is "
                             f"not shown; {_TOKEN_HINT})")
        if len(text) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token: too short ({len(text)} characters; at least "
                             f"{MIN_TOKEN_LENGTH}; {_TOKEN_HINT})")
        return self


SeverityName = Literal["debug", "info", "warning", "error", "critical"]


class ApiConfig(_Section):
    listen: str | None = None
    signing_secret: SecretStr | None = None
    signing_secret_file: Path | None = None
    tokens: dict[str, TokenConfig] = {}
    # GET/HEAD /v1/status, /v1/mode, /v1/events, /v1/openapi.json without auth on TCP.
    open_read: bool = False
    # /metrics needs auth on TCP; None: only when `listen` is not a loopback address.
    metrics_auth: bool | None = None
    # Who may read the node page without signing in: "loopback" (a browser on this
    # host) or "token" (nobody; behind a reverse proxy on this host every visitor
    # looks local).
    ui_read: Literal["loopback", "token"] = "loopback"
    max_body_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # Concurrent TCP connections; one more is answered 503 and closed. The control
    # socket has its own budget (socket_connections), so the CLI gets in regardless.
    max_connections: int = Field(256, ge=1, le=65536)
    socket_connections: int = Field(64, ge=1, le=4096)
    # A connection must deliver a request's headers within this long of opening, or of
    # the previous response (keep-alive idle); else it is closed.
    idle_timeout: Duration = 15.0
    # A request's body must arrive within this long of its headers (408 otherwise).
    body_timeout: Duration = 30.0
    # Failed authentications one client address may make in a burst, refilled at
    # auth_failure_rate per second; past it, 429 with Retry-After.
    auth_failure_burst: int = Field(10, ge=1)
    auth_failure_rate: float = Field(1.0, gt=0)  # per second, not a time

    @model_validator(mode="after")
    def _secret(self) -> ApiConfig:
        _resolve_secret(self, "signing_secret", "signing_secret_file")
        _check_whsec(self.signing_secret, "signing_secret")
        for name, token in self.tokens.items():
            if token.require_signature and self.signing_secret is None:
                raise ValueError(f"tokens: {name}.require_signature needs [api] "
                                 "signing_secret_file (or signing_secret)")
        return self

    def listens_beyond_loopback(self) -> bool:
        """Whether `listen` is set to an address other hosts can reach."""
        if self.listen is None:
            return False
        host = self.listen.rpartition(":")[0].strip("[]")
        try:
            return not (host == "localhost" or ipaddress.ip_address(host).is_loopback)
        except ValueError:
            return True

    def metrics_need_auth(self) -> bool:
        return self.listens_beyond_loopback() if self.metrics_auth is None else \
            self.metrics_auth


class DiscordConfig(_Section):
    token: SecretStr | None = None
    token_file: Path | None = None
    guild_id: NonNegativeInt = 0  # Discord ids (snowflakes) are positive; 0: none
    allowed_role_ids: list[PositiveInt] = []
    allowed_user_ids: list[PositiveInt] = []
    alert_channel_id: NonNegativeInt = 0
    alert_webhook_url: str = ""
    # Least severe event posted as an alert (webhook and channel).
    alert_min_severity: SeverityName = "warning"
    # A lost gateway connection that is back within this long is not announced.
    disconnect_grace: PositiveSeconds = 10.0
    # One bot for a fleet: a nodes file ([nodes.NAME] url, token_file; README, "More
    # than one node") gives /gpu status, mode and unblock a `node` option that calls
    # that node's API with its token. Each node's token needs act_for = ["discord"].
    nodes_file: Path | None = None

    @model_validator(mode="after")
    def _secret(self) -> DiscordConfig:
        _resolve_secret(self, "token", "token_file")
        if self.nodes_file is not None:
            from .fleet import load_nodes

            path = _credential_path(self.nodes_file)
            try:
                load_nodes(str(path), env_hint=False)
            except ConfigError as exc:
                raise ValueError(f"nodes_file: {path}: " + "; ".join(exc.problems)) from exc
            object.__setattr__(self, "nodes_file", path)
        if self.alert_channel_id and self.token is None:
            raise ValueError("alert_channel_id: set, but the bot that posts there has no "
                             "token: set token_file (or token), or use alert_webhook_url")
        return self

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, url: str) -> str:
        return _check_webhook_url(url) if url else url


class N8nConfig(_Section):
    event_webhook_urls: list[str] = []
    signing_secret: SecretStr | None = None
    signing_secret_file: Path | None = None
    # A header sent with every event, for n8n's Header Auth on the Webhook node: a
    # request without it is refused before the flow runs.
    auth_header: str = ""
    auth_value: SecretStr | None = None
    auth_value_file: Path | None = None
    min_severity: SeverityName = "info"

    @field_validator("event_webhook_urls")
    @classmethod
    def _webhook_urls(cls, urls: list[str]) -> list[str]:
        return [_check_webhook_url(url) for url in urls]

    @model_validator(mode="after")
    def _secret(self) -> N8nConfig:
        _resolve_secret(self, "signing_secret", "signing_secret_file")
        _check_whsec(self.signing_secret, "signing_secret")
        _resolve_secret(self, "auth_value", "auth_value_file")
        if bool(self.auth_header) != (self.auth_value is not None):
            raise ValueError("auth_header: set it together with auth_value_file (or "
                             "auth_value), or neither")
        if self.auth_header and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+",
                                                 self.auth_header):
            raise ValueError(f"auth_header: not an HTTP header name: {self.auth_header!r}")
        return self


class _DemandFront(_Section):
    """What a demand proxy and the model router share: how demand waits at their door,
    who may knock, and how many connections they hold."""

    # How long a demand request waits for its mode before it is answered 503.
    max_wait: Duration = 120.0
    # Demand requests that may wait at once; one more is answered 503 at once.
    max_waiting: int = Field(100, ge=1)
    # Once demand gave this workload's mode the GPU, demand for another mode waits at
    # least this long while this one still has work; a mode switched to by hand is held
    # this long in any case.
    min_dwell: NonNegativeSeconds = 30.0
    # Demand for a mode of higher priority (its workloads' highest `priority`) may stop
    # a ComfyUI with jobs running or queued, interrupting them.
    preempt: bool = False
    # Host names (a leading "*." for a whole domain) this proxy answers to beyond the
    # machine's own names and addresses and loopback.
    allowed_hosts: list[Annotated[str, BeforeValidator(_check_allowed_host)]] = []
    # Origins (scheme://host[:port]) of pages on other sites allowed to call it from a
    # browser.
    allowed_origins: list[Annotated[str, BeforeValidator(_check_origin)]] = []
    # Connections open at once; one more is answered 503 and closed. Each holds two
    # descriptors (the client's and the upstream's): see check-config's open-files sum.
    max_connections: int = Field(512, ge=1, le=65536)
    # A connection must deliver a request's headers within this long of opening, or of
    # its previous answer (keep-alive idle); else it is closed. Never cuts a request
    # being answered or waiting for its mode, a stream or a websocket.
    idle_timeout: Duration = 15.0
    # A request body may pause at most this long between two pieces; else it is cut.
    body_timeout: Duration = 30.0


class ProxyConfig(_DemandFront):
    """A demand proxy in front of one workload's HTTP API (`[proxy.<workload>]`)."""

    # Where clients connect: the address they used for the workload itself (move the
    # workload to another port and set its `url` there).
    listen: str
    # The API behind it, which decides what is demand: "ollama" or "comfyui".
    # Default: the workload's `release`.
    api: Literal["ollama", "comfyui"] | None = None
    # The mode a request switches to; needed only when the workload is in several.
    mode: str | None = None


class RouterConfig(_DemandFront):
    """One OpenAI-compatible address for every workload's `models`: a request's "model"
    picks the workload, and a model whose mode is not active is demand (`[router]`).
    The rest as in [proxy.*], for the modes of the router's models."""

    # Where clients connect (default: none, no router), e.g. "127.0.0.1:8080".
    listen: str | None = None


class DeliveryConfig(_Section):
    """Outbound webhooks: a bounded queue per receiver, retries with backoff."""

    queue_size: int = Field(1000, ge=1)
    backoff_base: PositiveSeconds = 0.5
    backoff_max: PositiveSeconds = 60.0
    timeout: PositiveSeconds = 10.0


class Config(BaseSettings):
    """The whole validated configuration (see config.example.toml)."""

    model_config = SettingsConfigDict(
        env_prefix="GPUWARDEN_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    daemon: DaemonConfig = DaemonConfig()
    docker: DockerConfig = DockerConfig()
    gpu: GpuConfig = GpuConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    release: ReleaseConfig = ReleaseConfig()
    crashloop: CrashloopConfig = CrashloopConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    workloads: dict[str, WorkloadConfig] = {}
    modes: dict[str, ModeConfig] = {}
    api: ApiConfig = ApiConfig()
    discord: DiscordConfig = DiscordConfig()
    n8n: N8nConfig = N8nConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    proxy: dict[str, ProxyConfig] = {}
    router: RouterConfig = RouterConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)

    def all_modes(self) -> dict[str, ModeConfig]:
        """The configured modes plus `idle`, which always exists and runs nothing."""
        modes = dict(self.modes)
        modes.setdefault(IDLE_MODE, _IDLE)  # one instance: asked on every proxied request
        return modes

    def gpu_indices(self) -> list[int]:
        """GPUs that modes are defined for (always at least GPU 0)."""
        return sorted({0} | {m.gpu for m in self.modes.values()})

    def modes_on_gpu(self, gpu: int) -> list[str]:
        return [name for name, mode in self.all_modes().items() if mode.gpu == gpu or
                name == IDLE_MODE]

    def modes_of_workload(self, workload: str) -> list[str]:
        return [name for name, mode in self.modes.items() if workload in mode.workloads]

    def proxy_mode(self, workload: str) -> str:
        """The mode a demand request through `workload`'s proxy switches to."""
        proxy = self.proxy[workload]
        return proxy.mode or self.modes_of_workload(workload)[0]

    def mode_priority(self, mode: str) -> int:
        """A mode's priority: the highest of its workloads'."""
        return max((self.workloads[w].priority for w in self.all_modes()[mode].workloads
                    if w in self.workloads), default=0)

    def proxy_api(self, workload: str) -> str:
        api = self.proxy[workload].api or self.workloads[workload].release
        assert api in ("ollama", "comfyui"), "validated with the config"
        return api

    def routed_models(self) -> dict[str, str]:
        """Each model id the router serves, and the workload serving it."""
        return {model: name for name, workload in self.workloads.items()
                for model in workload.models}

    def gpu_of_workload(self, workload: str) -> int | None:
        for mode in self.modes.values():
            if workload in mode.workloads:
                return mode.gpu
        return None


def under_systemd() -> bool:
    """Whether this process is a service's main process under systemd's system manager,
    with the system bus there. INVOCATION_ID alone is inherited by anything a service
    runs (a CI job's test daemons), hence the parent check."""
    return bool(os.environ.get("INVOCATION_ID")) and os.getppid() == 1 \
        and os.path.isdir("/run/systemd/system") \
        and os.path.exists("/run/dbus/system_bus_socket")


def process_runner(config: Config) -> str:
    """"systemd" (transient units) or "child", as `[daemon] process_runner` decides."""
    runner = config.daemon.process_runner
    if runner == "auto":
        return "systemd" if under_systemd() else "child"
    return runner


def config_warnings(config: Config) -> list[str]:
    """Valid, but probably not what the operator wants: each by key path."""
    warnings: list[str] = []
    dc = config.discord
    if dc.token is not None and not dc.allowed_role_ids and not dc.allowed_user_ids:
        warnings.append(
            "discord.allowed_role_ids: empty, and so is allowed_user_ids: /gpu mode and "
            "/gpu unblock are refused to everyone (/gpu status still answers)")
    if config.discord.token is not None and not config.discord.guild_id:
        warnings.append(
            "discord.guild_id: 0 syncs /gpu globally, so every server that invites the bot "
            "can use it (and /gpu status shows this node); set your server's id, and turn "
            "off Public Bot in the Developer Portal")
    router = config.router.listen
    address = parse_listen(router) if router else None
    if address is not None and address[0] != "localhost" and \
            not ipaddress.ip_address(address[0]).is_loopback:
        warnings.append(
            f"router.listen: {router} is reachable from other hosts, and the router adds "
            "no authentication (llama-swap's apiKeys have no equivalent): anyone who "
            "reaches it can use every model and switch this GPU's mode; keep it on "
            "loopback or a private network")
    for name, proxy in config.proxy.items():
        address = parse_listen(proxy.listen)
        loopback = address is not None and (
            address[0] == "localhost" or ipaddress.ip_address(address[0]).is_loopback)
        if loopback and proxy.allowed_hosts:
            warnings.append(
                f"proxy.{name}.allowed_hosts: names hosts, but listen {proxy.listen} is a "
                "loopback address, which containers on a bridge network and other hosts "
                "cannot reach: listen on an address they reach for those names to matter")
        if address is not None and not loopback and not _is_local_address(address[0]):
            warnings.append(
                f"proxy.{name}.listen: {address[0]} is not an address of this host now; "
                "the daemon cannot start until it is (a Docker bridge's gateway exists "
                "while Docker runs)")
        if address is not None and not loopback:
            warnings.append(
                f"proxy.{name}.listen: {proxy.listen} is reachable from other hosts, and the "
                "proxy adds no authentication (Ollama and ComfyUI have none): anyone who "
                "reaches it can switch this GPU's mode; keep it on loopback or a private "
                "network"
                + ("" if proxy.allowed_hosts else
                   ". Clients that reach it by a name other than this machine's host name "
                   "or addresses (host.docker.internal, gpu.lan) are refused 403 until "
                   "that name is in allowed_hosts"))
        if proxy.preempt and name in config.workloads:
            mode = proxy.mode or next(iter(config.modes_of_workload(name)), None)
            if mode is None:
                continue
            own = config.mode_priority(mode)
            others = [m for m in config.modes_on_gpu(config.modes[mode].gpu)
                      if m not in (mode, IDLE_MODE)]
            if others and all(config.mode_priority(m) >= own for m in others):
                warnings.append(
                    f"proxy.{name}.preempt: true, but mode {mode!r} (priority {own}, its "
                    "workloads' highest) is not above any other mode on its GPU, so it never "
                    "preempts; raise workloads.NAME.priority")
    if process_runner(config) == "systemd":
        for name, wl in config.workloads.items():
            if wl.kind == "process" and wl.restart_policy != "no":
                warnings.append(
                    f"workloads.{name}.restart_policy: applies to process workloads run as "
                    "children; run as a transient unit (as here) it is not restarted: a "
                    "kind = \"systemd\" unit with "
                    "Restart= is, watched by the crash-loop guard")
    for name, wl in config.workloads.items():
        if wl.kind == "process" and wl.command and not _runnable(wl.command[0], wl.cwd):
            warnings.append(
                f"workloads.{name}.command: {wl.command[0]!r} is not an executable here "
                "(not on PATH, or no such file): the workload's first start would fail")
    warnings.extend(_open_files_warnings(config))
    return warnings


def _runnable(program: str, cwd: Path | None) -> bool:
    """Whether `program` names an executable: a path (relative ones from `cwd`), or a
    name on PATH."""
    if "/" in program:
        path = Path(program) if cwd is None else cwd / program
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(program) is not None


def _is_local_address(host: str) -> bool:
    """Whether `host` is a wildcard or one of this host's interface addresses now."""
    import socket

    import psutil

    if host in ("0.0.0.0", "::", ""):
        return True
    return any(a.address.split("%", 1)[0] == host
               for addresses in psutil.net_if_addrs().values() for a in addresses
               if a.family in (socket.AF_INET, socket.AF_INET6))


# The shipped unit's LimitNOFILE= (systemd/gpuwarden.service).
UNIT_OPEN_FILES = 4096


def _open_files_warnings(config: Config) -> list[str]:
    """The connection budgets against the open files the daemon can get: the unit's
    LimitNOFILE=, or this process's hard limit when that is lower."""
    import resource

    from .api_server import OWN_FILES, PROXY_FILES_PER_CONNECTION, files_needed

    api = config.api
    proxies = {f"proxy.{name}": proxy.max_connections for name, proxy in config.proxy.items()}
    if config.router.listen is not None:
        proxies["router"] = config.router.max_connections
    needed = files_needed(api.max_connections if api.listen else 0, api.socket_connections,
                          proxies)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = [(UNIT_OPEN_FILES, f"the unit's LimitNOFILE={UNIT_OPEN_FILES}")]
    if hard != resource.RLIM_INFINITY and hard < UNIT_OPEN_FILES:
        limits.append((hard, f"this shell's hard limit ({hard})"))
    limit, where = min(limits)
    if needed <= limit:
        return []
    parts = [f"api.socket_connections {api.socket_connections}",
             f"{OWN_FILES} of the daemon's own"]
    if api.listen:
        parts.insert(0, f"api.max_connections {api.max_connections}")
    parts += [f"{PROXY_FILES_PER_CONNECTION} x {n}.max_connections {c}"
              for n, c in proxies.items()]
    return [f"connection budgets: they need {needed} open files ({', '.join(parts)}), more "
            f"than {where}: the daemon shrinks the proxies' budgets first, then the API's, "
            "never the control socket's; raise LimitNOFILE= or lower max_connections"]


def _cross_check(config: Config) -> list[str]:
    """Problems no single section can see on its own, each by key path."""
    problems: list[str] = []
    t = config.thresholds
    if not t.warn < t.alert:
        problems.append(f"thresholds.warn: must be below thresholds.alert ({t.warn} >= {t.alert})")
    if not t.alert < t.critical:
        problems.append(
            f"thresholds.alert: must be below thresholds.critical ({t.alert} >= {t.critical})"
        )
    if t.clear_margin >= t.warn:
        problems.append(
            f"thresholds.clear_margin: must be below thresholds.warn ({t.clear_margin} >= {t.warn})"
        )
    idle = config.modes.get(IDLE_MODE)
    if idle is not None and idle.workloads:
        problems.append("modes.idle.workloads: the idle mode always runs nothing")
    modes = config.all_modes()
    if config.daemon.default_mode not in modes:
        problems.append(
            f"daemon.default_mode: no mode named {config.daemon.default_mode!r} "
            f"(modes: {', '.join(sorted(modes))})"
        )
    gpu_of: dict[str, tuple[int, str]] = {}
    for name, mode in config.modes.items():
        for workload in mode.workloads:
            if workload not in config.workloads:
                problems.append(f"modes.{name}.workloads: no workload named {workload!r}")
                continue
            seen = gpu_of.setdefault(workload, (mode.gpu, name))
            if seen[0] != mode.gpu:
                problems.append(
                    f"modes.{name}.gpu: workload {workload!r} is also in mode {seen[1]!r} "
                    f"on GPU {seen[0]}; a workload belongs to one GPU"
                )
        if config.gpu.backend == "sim" and mode.gpu >= config.gpu.sim.count:
            problems.append(
                f"modes.{name}.gpu: GPU {mode.gpu} does not exist "
                f"(gpu.sim.count = {config.gpu.sim.count})"
            )
    if config.api.listen is not None:
        problems.extend(_check_listen(config.api))
    problems.extend(_check_proxies(config))
    problems.extend(_check_router(config))
    served: dict[str, str] = {}
    for name, each in config.workloads.items():
        for model in each.models:
            if model in served:
                problems.append(f"workloads.{name}.models: {model!r} is also served by "
                                f"workload {served[model]!r}; a model id names one workload")
            served.setdefault(model, name)
    api_secret, n8n_secret = config.api.signing_secret, config.n8n.signing_secret
    if (api_secret is not None and n8n_secret is not None
            and api_secret.get_secret_value() == n8n_secret.get_secret_value()):
        # Outbound events signed with it could be replayed inbound as commands.
        problems.append("api.signing_secret: the same as n8n.signing_secret; use two "
                        "secrets (gpuwarden secret whsec), one per direction")
    return problems


def parse_listen(listen: str) -> tuple[str, int] | None:
    """`HOST:PORT` (host an IP address or localhost, [v6] allowed) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host.strip("[]")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
    return host, int(port)


def _listen_problem(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if sep and port.isdigit() and host and not 0 < int(port) < 65536:
        return f"port {port} is out of range (1-65535)"
    return (f"expected host:port with an IP address or localhost (like 127.0.0.1:11434), "
            f"got {listen!r}")


def _same_socket(a: tuple[str, int], b: tuple[str | None, int | None]) -> bool:
    """Whether two listening addresses collide: the same port on the same host, under
    any of its loopback names, or where either side is a wildcard (0.0.0.0, ::)."""
    if a[1] != b[1] or b[0] is None:
        return False
    names = []
    for host in (a[0], b[0]):
        try:
            ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            return False  # a name we cannot compare: the workload's own business
        names.append(ip)
    x, y = names
    return x == y or x.is_unspecified or y.is_unspecified or (x.is_loopback and y.is_loopback)


def _workload_address(url: str | None) -> tuple[str | None, int | None]:
    try:
        target = urlsplit(url or "")
        return target.hostname, target.port
    except ValueError:  # a bad port in the url: reported on its own key
        return None, None


def _check_router(config: Config) -> list[str]:
    router = config.router
    if router.listen is None:
        return []
    address = parse_listen(router.listen)
    if address is None:
        return [f"router.listen: {_listen_problem(router.listen)}"]
    problems: list[str] = []
    routed = config.routed_models()
    if not routed:
        problems.append("router.listen: no workload names its models (workloads.NAME.models "
                        "= [\"id\", ...]); the router would serve nothing")
    taken: list[tuple[str, tuple[str | None, int | None] | None]] = [
        ("api.listen", parse_listen(config.api.listen) if config.api.listen else None)]
    taken += [(f"proxy.{name}.listen", parse_listen(p.listen))
              for name, p in config.proxy.items()]
    taken += [(f"workloads.{name}.url", _workload_address(w.url))
              for name, w in config.workloads.items()]
    for key, other in taken:
        if other is not None and _same_socket(address, other):
            problems.append(f"router.listen: {router.listen} collides with {key}")
    for name in sorted(set(routed.values())):
        modes = config.modes_of_workload(name)
        if len(modes) != 1:
            problems.append(f"workloads.{name}.models: the router switches to a model's "
                            f"mode, and workload {name!r} is in "
                            + (f"modes {', '.join(modes)}: keep it in one" if modes
                               else "no mode: add it to one"))
    return problems


def _check_proxies(config: Config) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    api_listen = parse_listen(config.api.listen) if config.api.listen else None
    for name, proxy in config.proxy.items():
        key = f"proxy.{name}"
        workload = config.workloads.get(name)
        if workload is None:
            problems.append(f"{key}: no workload named {name!r} (a proxy's table is named "
                            f"after its workload: {', '.join(sorted(config.workloads))})")
            continue
        if not workload.url:
            problems.append(f"{key}: workload {name!r} has no url to forward to (set "
                            f"workloads.{name}.url)")
        if (proxy.api or workload.release) not in ("ollama", "comfyui"):
            problems.append(f"{key}.api: set \"ollama\" or \"comfyui\" (workload {name!r} "
                            f"has release = {workload.release!r}, so its API is not known)")
        modes = config.modes_of_workload(name)
        if proxy.mode is not None and proxy.mode not in modes:
            problems.append(f"{key}.mode: {proxy.mode!r} is not a mode of workload {name!r} "
                            f"(its modes: {', '.join(modes) or 'none'})")
        elif proxy.mode is None and len(modes) != 1:
            problems.append(f"{key}.mode: workload {name!r} is in "
                            + (f"modes {', '.join(modes)}: say which one demand switches to"
                               if modes else "no mode: add it to one"))
        address = parse_listen(proxy.listen)
        if address is None:
            problems.append(f"{key}.listen: {_listen_problem(proxy.listen)}")
            continue
        for other, taken in seen.items():
            if _same_socket(address, other):
                problems.append(f"{key}.listen: {proxy.listen} collides with proxy.{taken}'s "
                                "listen")
        seen[address] = name
        if api_listen is not None and _same_socket(address, api_listen):
            problems.append(f"{key}.listen: {proxy.listen} collides with api.listen")
        for other_name, workload_config in config.workloads.items():
            if not _same_socket(address, _workload_address(workload_config.url)):
                continue
            if other_name == name:
                problems.append(f"{key}.listen: {proxy.listen} is the workload's own url; "
                                "move the workload to another port, or the proxy would "
                                "forward to itself")
            else:
                problems.append(f"{key}.listen: {proxy.listen} is the url of workload "
                                f"{other_name!r}; pick a free port")
    return problems


def _check_listen(api: ApiConfig) -> list[str]:
    host, sep, port = (api.listen or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"api.listen: expected host:port, got {api.listen!r}"]
    host = host.strip("[]")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return [f"api.listen: host must be an IP address or localhost, got {host!r}"]
    if api.listens_beyond_loopback() and not api.tokens and api.signing_secret is None:
        return [
            f"api.listen: refusing to listen on non-loopback {host} without auth "
            "(configure api.tokens or api.signing_secret_file)"
        ]
    return []


def _check_webhook_url(url: str) -> str:
    """An http(s) URL with a host and a valid port. The message never repeats the URL:
    it may carry credentials."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError("must be an http:// or https:// URL with a host and a valid port "
                         "(the value is not shown: it may hold credentials)")
    return url


# Keys whose values may hold credentials: never echoed in an error.
_SECRET_KEYS = ("url", "token", "secret", "password")


def _format_error(err: Any) -> str:
    """'key.path: what is wrong', or, for a key set from the environment,
    'GPUWARDEN_KEY__PATH (environment, for key.path): what is wrong'."""
    path = ".".join(str(part) for part in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    # A section's own check names its key first ("token_file: cannot read ..."): that
    # key belongs in the path.
    key = re.match(r"([a-z][a-z0-9_]*): ", msg)
    if err["type"] == "value_error" and key and path != "(top level)":
        path, msg = f"{path}.{key.group(1)}", msg[key.end():]
    variable = _env_variable(path)
    where = path if variable is None else f"{variable} (environment, for {path})"
    return f"{where}: {_describe(err, path, msg)}"


def _env_problem(error: str) -> str:
    """A setting from the environment that could not even be parsed (pydantic-settings
    says only which section), named by its variables."""
    found = re.search(r'field "([^"]+)"', error)
    section = found.group(1) if found else ""
    prefix = f"GPUWARDEN_{section.upper()}"
    names = sorted(n for n in os.environ if section and n.upper().startswith(prefix))
    return (f"{', '.join(names) or 'a GPUWARDEN_ variable'} (environment, for "
            f"{section or 'a section'}): cannot be read; a list or table is written as "
            "JSON, e.g. GPUWARDEN_MODES__LLM__WORKLOADS='[\"ollama\"]'")


def _env_variable(path: str) -> str | None:
    """The environment variable that set the key at `path`, if one did."""
    wanted = "GPUWARDEN_" + path.upper().replace(".", "__")
    return next((name for name in os.environ if name.upper() == wanted), None)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the table at `loc` takes (Config's fields, then each section's)."""
    node: Any = Config
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if fields is not None:
            if str(part) not in fields:
                return []
            node = fields[str(part)].annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]  # [workloads.NAME]: NAME is anybody's
        else:
            return []
        while get_origin(node) in (Annotated, Union, UnionType):  # Optional, Annotated
            node = next((a for a in get_args(node) if a is not type(None)), None)
    fields = getattr(node, "model_fields", None)
    return list(fields) if fields is not None else []


def _describe(err: Any, path: str, msg: str) -> str:
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1,
                                          cutoff=0.7)
        return f"unknown key; did you mean {close[0]!r}?" if close else "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if any(word in path.lower() for word in _SECRET_KEYS):
        return msg  # never the value
    if err["type"] in ("less_than_equal", "less_than") and path.startswith("thresholds.") \
            and isinstance(value, int | float) and 1 < value <= 100:
        return f"a fraction of VRAM, not a percentage (got {value!r}; write {value / 100:.2f})"
    if err["type"] == "literal_error" and isinstance(value, str):
        options = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
        if close:
            return f"{msg} (got {value!r}; did you mean {close[0]!r}?)"
    if isinstance(value, str | int | float | bool) and err["type"] != "value_error":
        return f"{msg} (got {value!r})"
    return msg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, override from the environment, and validate the configuration.

    Raises:
        ConfigError: the file is unreadable or not TOML, or any key is invalid; the
            error's `problems` names every one by key path, all in one pass.
    """
    file = Path(config_path(path))
    encoding: list[str] = []
    data = read_toml(file, encoding)
    token = _secret_base.set(file.resolve().parent)
    try:
        config, problems = _validate(data)
        problems = encoding + problems
    except SettingsError as exc:
        raise ConfigError([_env_problem(str(exc))], str(file)) from exc
    finally:
        _secret_base.reset(token)
    if config is None or problems:
        raise ConfigError(problems, str(file))
    return config


def _validate(data: dict[str, Any]) -> tuple[Config | None, list[str]]:
    """The config and every problem with it. A key that fails validation is reported,
    set aside and validation goes on without it, so that one run names the typo, the
    bad value *and* the cross-section problems behind them (thresholds out of order,
    a mode naming a workload that does not exist). Cross-section problems about what
    was set aside (a mode naming a workload whose table was invalid) are left out:
    they would only repeat the first problem."""
    problems: list[str] = []
    dropped: set[str] = set()  # names of the workloads and modes set aside
    current = copy.deepcopy(data)
    # A bad value from the environment is set aside by leaving its variable out for
    # the next pass; the environment is put back as it was before this returns.
    stashed: dict[str, str] = {}
    try:
        for _ in range(_MAX_PASSES):
            try:
                config = Config(**current)
            except ValidationError as exc:
                removed = False
                for err in exc.errors():
                    path = ".".join(str(part) for part in err["loc"])
                    problem = _format_error(err)
                    # A key set aside for its bad value is then "missing": said once.
                    repeated = err["type"] == "missing" and any(
                        p.startswith(f"{path}: ") for p in problems)
                    if problem not in problems and not repeated:
                        problems.append(problem)
                    variable = _env_variable(path) if err["type"] != "missing" else None
                    if variable is not None:
                        stashed[variable] = os.environ.pop(variable)
                        removed = True
                    else:
                        removed |= _set_aside(current, tuple(err["loc"]), dropped)
                if not removed:
                    return None, problems
                continue
            follow_ons = [p for p in _cross_check(config)
                          if not any(f"{name!r}" in p for name in dropped)]
            return config, problems + [p for p in follow_ons if p not in problems]
        return None, problems
    finally:
        os.environ.update(stashed)


_MAX_PASSES = 8


def _set_aside(data: dict[str, Any], loc: tuple[Any, ...], dropped: set[str]) -> bool:
    """Remove the deepest key of `loc` present in `data` (a missing key: its table);
    True if something was removed."""
    parents: list[tuple[dict[str, Any], str]] = []
    node: Any = data
    for part in loc:
        if not isinstance(node, dict) or str(part) not in node:
            break
        parents.append((node, str(part)))
        node = node[str(part)]
    if not parents:
        return False
    table, key = parents[-1]
    del table[key]
    if len(loc) >= 2 and loc[0] in ("workloads", "modes") and len(parents) == 2:
        dropped.add(str(loc[1]))
    return True


