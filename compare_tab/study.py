"""User-study tab: blind pairwise votes (A / B / tie / both bad).

* Pairs come from the balanced (or active) schedule with secret seeds (see
  ``hypersd_core/study/config.py``): the page shows neither methods nor seed, and the
  public ``/generate`` cannot reproduce a study image.
* Each shown pair has a server-issued single-use token kept in server-side state.
* Voters are identified by a Hugging Face login (``require_login`` in study.yaml, with a
  Login button; works on a Space with ``hf_oauth: true``), else by a server-signed voter
  cookie set by :class:`VoterCookieMiddleware` (a client cannot mint a valid one; a fresh
  cookie only becomes a voter within a per-IP limit of new voters per hour), else, only
  when study.yaml allows it, the browser session. Ids are stored as salted hashes.
* Results are in their own tab (``study_results.py``), never beside the vote buttons.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from http.cookies import SimpleCookie

import gradio as gr
from PIL import Image

from hypersd_core.app.access import client_address
from hypersd_core.app.arms import Arm, ArmError, arm_choices, resolve_arm
from hypersd_core.app.service import AppSettings, ModelService, default_adapter_name
from hypersd_core.app.zerogpu import gpu, image_steps, request_seconds
from hypersd_core.study.config import derive_key, resolve_salt
from hypersd_core.study.provenance import code_version, weights_hash
from hypersd_core.study.store import (
    CHOICES,
    InvalidToken,
    PairContext,
    RateLimited,
    StudyConfig,
    StudyStore,
)
from ui_common.guard import guard

CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
COOKIE = "hypersd_voter"
COOKIE_MAX_AGE = 180 * 24 * 3600
MIN_SIDE = 256


# -------------------------------------------------------------------- voters
class VoterCookies:
    """Mint and verify server-signed voter ids: ``<random id>.<HMAC of the id>``."""

    def __init__(self, salt: bytes):
        self._key = derive_key(salt, "voter-cookie")

    def _sign(self, voter: str) -> str:
        return hmac.new(self._key, voter.encode(), hashlib.sha256).hexdigest()[:32]

    def mint(self) -> str:
        voter = secrets.token_urlsafe(16)
        return f"{voter}.{self._sign(voter)}"

    def verify(self, value: str | None) -> str | None:
        """The voter id of a valid cookie value, else None."""
        if not value or value.count(".") != 1:
            return None
        voter, sig = value.split(".")
        return voter if voter and hmac.compare_digest(sig, self._sign(voter)) else None


class VoterCookieMiddleware:
    """ASGI middleware: a GET without a valid voter cookie gets a fresh signed one
    (HttpOnly; SameSite=None; Secure over https, so it works inside a Space's iframe)."""

    def __init__(self, app, cookies: VoterCookies):
        self.app, self.cookies = app, cookies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        jar = SimpleCookie()
        try:
            jar.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # noqa: BLE001 - a malformed header counts as no cookie
            jar = SimpleCookie()
        current = jar[COOKIE].value if COOKIE in jar else None
        if self.cookies.verify(current):
            return await self.app(scope, receive, send)
        https = scope.get("scheme") == "https" or headers.get(b"x-forwarded-proto") == b"https"
        attrs = "; SameSite=None; Secure" if https else "; SameSite=Lax"
        cookie = (f"{COOKIE}={self.cookies.mint()}; Path=/; Max-Age={COOKIE_MAX_AGE}; "
                  f"HttpOnly{attrs}").encode("latin-1")

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers") or []) + [(b"set-cookie", cookie)]
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def study_middleware(settings: AppSettings):
    """The voter-cookie middleware for ``launch(app_kwargs={"middleware": [...]})``."""
    from starlette.middleware import Middleware

    return Middleware(VoterCookieMiddleware, cookies=VoterCookies(resolve_salt(settings.study_db)))


def client_ip(request: gr.Request | None, trusted_proxies: int = 0) -> str | None:
    """The client's address: the socket peer, or behind ``trusted_proxies`` proxies the
    X-Forwarded-For entry they wrote (counted from the right: entries a client writes
    itself are never read). Only used, hashed, for rate limits."""
    if request is None:
        return None
    client = getattr(request, "client", None)
    return client_address(getattr(request, "headers", None), getattr(client, "host", None),
                          trusted_proxies)


def identify(request: gr.Request | None, profile, cookies: VoterCookies,
             config: StudyConfig) -> tuple[str, str] | str:
    """(voter id, kind) for a request, or the reason it cannot vote."""
    login = getattr(profile, "username", None) or (
        getattr(request, "username", None) if request is not None else None)
    if login:
        return f"login:{login}", "login"
    if config.require_login:
        return "This study counts logged-in voters only: sign in with Hugging Face first."
    if request is None:  # a direct call in-process (tests, scripts), never through the API
        return "local", "session"
    voter = cookies.verify((getattr(request, "cookies", None) or {}).get(COOKIE))
    if voter:
        return f"cookie:{voter}", "cookie"
    if config.allow_session and getattr(request, "session_hash", None):
        return f"session:{request.session_hash}", "session"
    return ("Your browser did not send the study's voter cookie: reload the page "
            "(cookies must be allowed for this site).")


# ------------------------------------------------------------------- helpers
def arm_of(key: str, settings: AppSettings | None) -> Arm | None:
    """The arm a study method names (a recipe, run:<id>, adapter:<name>, a LoRA file), or
    None when the server has no such thing."""
    try:
        return resolve_arm(key, settings)
    except ArmError:
        return None


def playable_config(config: StudyConfig, service: ModelService,
                    settings: AppSettings | None = None) -> StudyConfig:
    """The study restricted to arms this model can run at every configured step count: a
    recipe whose adapter it has, or a run / adapter / file the server lists."""
    from dataclasses import replace

    def available(key: str) -> bool:
        arm = arm_of(key, settings)
        if arm is None:
            return False
        if arm.adapter is not None:
            return True
        return all(service.method_available(arm.recipe, n) for n in config.steps)

    missing = [m for m in config.methods if not available(m)]
    methods = [m for m in config.methods if m not in missing]
    if len(methods) < 2:
        raise gr.Error("the study needs two methods this model can run; missing adapters for "
                       f"{', '.join(missing)} (train them in the Train tab)")
    primary = config.primary
    if primary is not None and (primary.method not in methods
                                or not set(primary.against) & set(methods)):
        primary = None
    elif primary is not None:
        primary = replace(primary, against=tuple(a for a in primary.against if a in methods))
    return replace(config, methods=methods, primary=primary)


def pair_context(service: ModelService, config: StudyConfig,
                 settings: AppSettings | None = None) -> PairContext:
    """Base model, code version, and the adapter (name, weights hash) of every method@steps:
    a recipe's default adapter, or the weights of a run / shipped adapter / file arm."""
    sides = [(m, n) for m in config.methods for n in config.steps]
    if config.anchor is not None:
        sides.append((config.anchor.method, config.anchor.steps))
    adapters = {}
    dirs = service.sampler.backbone.adapter_dirs
    for m, n in sides:
        arm = arm_of(m, settings)
        if arm is not None and arm.adapter is not None:
            adapters[f"{m}@{n}"] = (arm.label, arm.weights_hash())
            continue
        name = default_adapter_name(m, n)
        if name and name in dirs:
            adapters[f"{m}@{n}"] = (name, weights_hash(dirs[name]))
    return PairContext(service.model, code_version(), adapters)


def for_screen(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """Small (digits-sized) images upscaled nearest-neighbour to at least ``min_side`` px
    (the app's display helper when present; SD-sized images unchanged)."""
    try:
        from ui_common.display import enlarge
    except ImportError:
        enlarge = None
    if enlarge is not None:
        return enlarge(image, min_px=min_side)
    if max(image.size) > 128:
        return image
    factor = math.ceil(min_side / max(1, min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class StudyHandlers:
    """The tab's event functions (also called directly by tests)."""

    def shown(self, key: str) -> str:
        """An arm's readable name for the reveal."""
        arm = arm_of(key, self.settings)
        return arm.label if arm is not None else key

    def use_arms(self, keys: list[str]) -> str:
        """Run the study over ``keys`` (arms) instead of study.yaml's methods; the primary
        comparison is kept when its arms are among them. Returns a status line."""
        from dataclasses import replace

        keys = list(dict.fromkeys(keys or []))
        if len(keys) < 2:
            raise gr.Error("a study needs at least two arms")
        bad = [k for k in keys if arm_of(k, self.settings) is None]
        if bad:
            raise gr.Error(f"not available on this server: {', '.join(bad)}")
        primary = self.config.primary
        if primary is not None and (primary.method not in keys
                                    or not set(primary.against) & set(keys)):
            primary = None
        elif primary is not None:
            primary = replace(primary, against=tuple(a for a in primary.against if a in keys))
        self.config = replace(self.config, methods=keys, primary=primary)
        self._playable = self._context = None
        config, _ = self.playable()
        return (f"The study now pairs {len(config.methods)} arms: "
                + ", ".join(self.shown(m) for m in config.methods) + ".")

    def __init__(self, service: ModelService, store: StudyStore, config: StudyConfig,
                 settings: AppSettings | None = None):
        self.service, self.store, self.config = service, store, config
        self.settings = settings  # resolves arms given as runs and files (None: recipes only)
        self.cookies = VoterCookies(store.salt)
        self._playable: StudyConfig | None = None
        self._context: PairContext | None = None

    def playable(self) -> tuple[StudyConfig, PairContext]:
        if self._playable is None:
            self._playable = playable_config(self.config, self.service, self.settings)
            self._context = pair_context(self.service, self._playable, self.settings)
        return self._playable, self._context

    def next_pair(self, request: gr.Request | None = None, profile=None) -> tuple:
        """Issue a pair and render it: (image A, image B, caption, reveal, token, buttons...)."""
        who = identify(request, profile, self.cookies, self.config)
        if isinstance(who, str):
            raise gr.Error(who)
        config, context = self.playable()
        pair = self.store.next_pair(config, context=context, viewer_id=who[0])
        images = []
        for method, steps in ((pair.left, pair.steps_left), (pair.right, pair.steps_right)):
            arm = arm_of(method, self.settings)
            if arm is None:
                raise gr.Error(f"the study arm {method!r} is no longer available")
            cell = self.service.generate(arm.recipe, steps, [pair.prompt], [pair.seed],
                                         adapter=arm.adapter)[0]
            if cell.error:
                raise gr.Error(f"could not render the pair: {cell.error}")
            images.append(for_screen(cell.image))
        plural = "" if pair.steps == 1 else "s"
        steps = (f"{pair.steps} step{plural}" if pair.steps_left == pair.steps_right
                 else "a reference and a fast image")
        text = f"**Prompt:** {pair.prompt} · {steps}"
        on = [gr.Button(interactive=True)] * len(CHOICES)
        return (images[0], images[1], text, "", pair.token, *on)

    def vote(self, choice: str, token: str | None, request: gr.Request | None = None,
             profile=None) -> tuple:
        """Cast a vote: (reveal message, token or None, buttons...)."""
        off = [gr.Button(interactive=False)] * len(CHOICES)
        on = [gr.Button(interactive=True)] * len(CHOICES)  # the pair stays votable
        who = identify(request, profile, self.cookies, self.config)
        if isinstance(who, str):
            gr.Warning(who)
            return (f"Vote not counted: {who}", token, *(on if token else off))
        if choice not in CHOICES:
            return (f"unknown choice {choice!r}", token, *off)
        if not token:
            return ("No pair on screen: press **Show a pair** first.", None, *off)
        try:
            vote = self.store.record_vote(
                token, choice, who[0], who[1],
                ip=client_ip(request, self.settings.trusted_proxies if self.settings else 0),
                new_voters_per_hour=self.config.new_voters_per_ip_per_hour,
                votes_per_minute=self.config.votes_per_ip_per_minute,
                votes_per_voter=self.config.votes_per_voter)
        except InvalidToken as err:
            gr.Warning(f"Vote rejected: {err}.")
            return (f"Vote rejected: {err}.", None, *off)
        except RateLimited as err:
            gr.Warning(f"Vote not counted: {err}.")
            return (f"Vote not counted: {err}.", token, *on)
        return (f"Thanks! **A** was **{self.shown(vote.method_a)}**, **B** was "
                f"**{self.shown(vote.method_b)}**; you "
                f"chose *{CHOICE_LABELS[choice]}*. Press **Show a pair** for the next one.",
                None, *off)


def build_study_tab(settings: AppSettings, service: ModelService, store: StudyStore,
                    config: StudyConfig) -> StudyHandlers:
    """Blind A/B voting with the reveal after the vote (results: the Study results tab)."""
    gr.Markdown("Two images from the same prompt, seed and step count, made by two methods "
                "in random order. Pick the better one; the methods are shown after you vote. "
                "Results are in the **Study results** tab.")
    if config.require_login:
        gr.LoginButton()
    handlers = StudyHandlers(service, store, config, settings)
    with gr.Accordion("Arms of this study (for the researcher running it)", open=False,
                      visible=not settings.public):
        gr.Markdown("Pick the arms to pair: recipes, your finished runs, shipped adapters and "
                    "LoRA files. Every vote records each side's weights hash. (study.yaml's "
                    "`methods` accepts the same keys: `run:<run id>`, `adapter:<name>`, a "
                    "file in the LoRA folder, `file@recipe`.)")
        arms = gr.CheckboxGroup(_arm_choices(settings, config), value=list(config.methods),
                                label="Arms", elem_id="study-arms")
        with gr.Row():
            use = gr.Button("Start the study with these arms", elem_id="study-use-arms")
            refresh = gr.Button("Refresh list", elem_id="study-refresh-arms")
        arms_md = gr.Markdown()
    show = gr.Button("Show a pair", variant="primary", elem_id="study-show")
    pair_md = gr.Markdown()
    with gr.Row():
        left = gr.Image(label="A", type="pil", format="png", interactive=False, height=MIN_SIDE,
                        show_label=True, elem_id="study-left",
                        elem_classes=["pixelated"])
        right = gr.Image(label="B", type="pil", format="png", interactive=False, height=MIN_SIDE,
                         show_label=True, elem_id="study-right",
                         elem_classes=["pixelated"])
    with gr.Row():
        buttons = {c: gr.Button(CHOICE_LABELS[c], interactive=False) for c in CHOICES}
    reveal = gr.Markdown()
    token = gr.State(None)  # server-side only: never sent to the browser

    def on_use(keys: list[str]):
        if settings.public:
            raise gr.Error("the study's arms are fixed in a public app (study.yaml)")
        return handlers.use_arms(keys)

    def refresh_arms(arms_v):
        return gr.CheckboxGroup(choices=_arm_choices(settings, config), value=arms_v)

    # the arms are the study owner's to set (refused on a public app, on the server)
    use.click(guard(on_use, "owner", settings), arms, arms_md, api_name="study_arms",
              api_visibility="private")
    refresh.click(guard(refresh_arms, "public", settings), arms, arms,
                  api_name="study_arm_list", api_visibility="private")

    def show_pair(request: gr.Request, profile: gr.OAuthProfile | None):
        return handlers.next_pair(request, profile)

    # two images per pair; at most the teacher's 25 steps with CFG each
    pair_seconds = request_seconds(lambda: service.kind, lambda *a: image_steps(2, 1, (25,)) * 2)
    show.click(guard(gpu(show_pair, duration=pair_seconds), "public", settings), None,
               [left, right, pair_md, reveal, token, *buttons.values()], api_name="study_show",
               concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def make_vote(choice: str):
        def handler(token_v: str | None, request: gr.Request, profile: gr.OAuthProfile | None):
            return handlers.vote(choice, token_v, request, profile)
        return handler

    for choice, btn in buttons.items():
        btn.click(guard(make_vote(choice), "public", settings), token,
                  [reveal, token, *buttons.values()], api_name=f"study_vote_{choice}",
                  api_visibility="private", concurrency_limit=None)
    return handlers


def _arm_choices(settings: AppSettings, config: StudyConfig) -> list[tuple[str, str]]:
    """Every arm the server offers, plus study.yaml's own methods (kept even when absent)."""
    choices = arm_choices(settings, recipes=True)
    keys = {k for _, k in choices}
    return choices + [(m, m) for m in config.methods if m not in keys]
