"""The Generate tab: one prompt, one recipe, any adapter (the method's own, a finished
run, a shipped adapter or a LoRA file); the ``/generate`` endpoint."""

from __future__ import annotations

import gradio as gr

from hypersd_core.app import limits
from hypersd_core.app.arms import LORA_RECIPES, ArmError, arm_choices, resolve_arm
from hypersd_core.app.service import AppSettings, ModelService, default_adapter_name
from hypersd_core.app.zerogpu import gpu, image_steps, request_seconds
from hypersd_core.models.sampling import RECIPES
from ui_common.display import image_classes
from ui_common.guard import guard

from .compare import GPU


def build_generate_tab(settings: AppSettings, service: ModelService) -> None:
    """One prompt, one recipe: the ``/generate`` endpoint."""
    with gr.Row():
        prompt = gr.Textbox("a red handwritten digit 7", label="Prompt", scale=3)
        method = gr.Dropdown(list(RECIPES), value="hypersd", label="Method")
        steps = gr.Slider(1, 50, value=RECIPES["hypersd"].default_steps, step=1, label="Steps")
        seed = gr.Number(0, precision=0, label="Seed")
    with gr.Row():
        adapter = gr.Dropdown(adapter_choices(settings), value="", scale=4,
                              label="Adapter: the method's own, a finished run, a shipped "
                                    "adapter or a file from the LoRA folder",
                              elem_id="generate-adapter")
        refresh = gr.Button("Refresh list", scale=1, elem_id="generate-refresh")
    recipe_md = gr.Markdown(_recipe_text("hypersd", RECIPES["hypersd"].default_steps))
    go = gr.Button("Generate", variant="primary", elem_id="generate-button")
    with gr.Row():
        image = gr.Image(label="Image", format="png", type="pil", interactive=False,
                         elem_id="generate-image", height=320,
                         elem_classes=image_classes(service.model))
        info = gr.JSON(label="Details")

    def generate_work(prompt, method, steps, seed, adapter="") -> int:
        return image_steps(1, 1, (int(steps),)) * (2 if method == "teacher" else 1)

    @gpu(duration=request_seconds(lambda: service.kind, generate_work))
    def generate(prompt: str, method: str, steps: float, seed: float, adapter: str = ""):
        """Generate one image: prompt, method (a recipe name), steps, seed, and an optional
        adapter (an arm key: run:<id>, adapter:<name>, lora:<file>) -> (PNG, details)."""
        if not prompt or not prompt.strip():
            raise gr.Error("enter a prompt")
        if method not in RECIPES:
            raise gr.Error(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
        try:  # bounded inputs (hypersd_core/app/limits.py)
            limits.check_prompt(prompt), limits.check_steps(steps), limits.check_seed(seed)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        arm = None
        if adapter:
            try:  # the method is the recipe: it decides for files whose recipe is unknown
                arm = resolve_arm(adapter, settings, method if method in LORA_RECIPES else None)
            except ArmError as err:
                raise gr.Error(str(err)) from None
        cell = service.generate(method, int(steps), [prompt.strip()], [int(seed or 0)],
                                adapter=arm.adapter if arm else None)[0]
        if cell.error:
            raise gr.Error(cell.error)
        details = {"method": method, "steps": int(steps), "seed": int(seed or 0),
                   "adapter": arm.label if arm else default_adapter_name(method, int(steps)),
                   "seconds": round(cell.seconds, 4), "model": service.model}
        if arm is not None:
            details["weights_sha256"] = arm.weights_hash()
        note = adapter_note(method, int(steps))
        if note:
            details["note"] = note
        return cell.image, details

    def on_method(method_v: str, steps_v: float):
        default = RECIPES[method_v].default_steps if method_v in RECIPES else int(steps_v)
        return gr.Slider(value=default), _recipe_text(method_v, default)

    def on_adapter(key: str, method_v: str, steps_v: float):
        """A chosen arm sets the recipe and the step count it was trained for."""
        if not key:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            arm = resolve_arm(key, settings, method_v if method_v in LORA_RECIPES else None)
        except ArmError:  # unknown recipe: the user picks the method
            return gr.skip(), gr.skip(), _recipe_text(method_v, steps_v)
        n = arm.steps or RECIPES[arm.recipe].default_steps
        return arm.recipe, gr.Slider(value=n), _recipe_text(arm.recipe, n)

    def refresh_adapters():
        return gr.Dropdown(choices=adapter_choices(settings))

    # every event: a role checked on the server and an explicit name (ui_common/guard.py)
    method.input(guard(on_method, "public", settings), [method, steps], [steps, recipe_md],
                 api_name="generate_method", api_visibility="private")
    adapter.input(guard(on_adapter, "public", settings), [adapter, method, steps],
                  [method, steps, recipe_md], api_name="generate_adapter",
                  api_visibility="private")
    refresh.click(guard(refresh_adapters, "public", settings), None, adapter,
                  api_name="generate_adapters", api_visibility="private")
    steps.change(guard(_recipe_text, "public", settings), [method, steps], recipe_md,
                 api_name="generate_recipe", api_visibility="private", show_progress="hidden")
    go.click(guard(generate, "public", settings), [prompt, method, steps, seed, adapter],
             [image, info], api_name="generate", **GPU)


def adapter_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """The Generate tab's adapter picker: the method's own, then every arm with weights."""
    return [("(the method's own adapter)", "")] + arm_choices(settings)


def adapter_note(method: str, steps: int) -> str:
    """Says when Hyper-SD N-step runs with the adapter of another stage (3 steps: k=4)."""
    r = RECIPES.get(method)
    name = default_adapter_name(method, steps)
    if r is None or not r.adapter or "{k}" not in r.adapter or name is None:
        return ""
    k = int(name.rsplit("k", 1)[-1]) if name.rsplit("k", 1)[-1].isdigit() else None
    if k is None or k == steps:
        return ""
    return (f"no TSCD stage k={steps}: {steps} steps use the k={k} adapter ({name}), "
            f"trained for {k} steps")


def _recipe_text(method: str, steps: float | None = None) -> str:
    r = RECIPES.get(method)
    if r is None:
        return ""
    text = f"*{r.description}* (default {r.default_steps} step{'s' * (r.default_steps != 1)})"
    note = adapter_note(method, int(steps)) if steps else ""
    return text + (f"  \n**Note:** {note}" if note else "")
