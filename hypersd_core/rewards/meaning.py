"""What each score the app shows means, in one place: what it measures, its range, which
way is better, how it is known to fail, and where the app shows it.

The app renders these (Rewards tab, Compare tab) and docs/app.md repeats them; the
``range`` and ``higher_is_better`` here are checked against each reward class's own
attributes by the tests, so the words cannot drift from the code. Importing this module
loads no reward model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreMeaning:
    """A score explained for a person reading it next to an image."""

    name: str
    measures: str
    range: tuple[float, float] | None  # None: unbounded
    range_text: str  # the values seen in practice, in words
    higher_is_better: bool
    failure: str  # how it is known to mislead
    shown: str  # where the app shows it

    def markdown(self) -> str:
        """One bullet: name, direction and range, then what it measures and its failure."""
        better = "higher is better" if self.higher_is_better else "lower is better"
        return (f"- **{self.name}** ({better}; {self.range_text}): {self.measures} "
                f"*Known failure:* {self.failure} *Shown in:* {self.shown}.")


SCORES: dict[str, ScoreMeaning] = {m.name: m for m in (
    ScoreMeaning(
        "digits-quality",
        "how much the image looks like a clean handwritten digit in the prompted colour: a "
        "small CNN conditioned on the prompt's colour, trained to grade real digits above "
        "the teacher's 4-, 2- and 1-step images, and noise, off-hue, blurred, erased or "
        "blank images lowest.",
        (0.0, 1.0), "0 to 1", True,
        "it is a learned judge and can be gamed: it grades only what it was trained on, "
        "and reward training against it can find images it over-rates (its colour-blind "
        "predecessor scored the 1-step teacher's coloured noise near 1). Read it together "
        "with digits-alignment and the image.",
        "Rewards tab (scores table and the run's reward plot), Compare tab (cell captions "
        "and the cells table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "digits-alignment",
        "whether the image shows what the prompt asks for: p(digit = the prompted digit) "
        "x p(colour = the prompted colour), from a small CNN classifier.",
        (0.0, 1.0), "0 to 1", True,
        "a classifier can be confident on images that are not digits at all, and "
        "reward fine-tuning against it can push images towards what it finds typical "
        "rather than towards good digits. It only reads prompts of the form "
        "'a <colour> handwritten digit <d>'.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "scenes-quality",
        "how clean a scenes-world image looks: a small CNN regressed on graded "
        "degradations of real renders (noise, blur, blotchy colour, hue rotation, washed-out "
        "contrast; target 1 - severity). It ignores the prompt.",
        (0.0, 1.0), "0 to 1; pure noise near 0", True,
        "it knows only the degradations it was trained on: a clean image of the wrong "
        "objects scores as high as the right one. Read it with scenes-alignment.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "scenes-alignment",
        "how well a scenes-world image matches its prompt: a per-cell reader of the 2x2 "
        "grid (class, colour, size) scored against the prompt's objects, relation or "
        "count (geometric mean of the parts).",
        (0.0, 1.0), "0 to 1", True,
        "the reader can be confident on images unlike real scenes, and feedback training "
        "against it can find such images; it only reads prompts of the scenes grammar.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "digits-perception",
        "a loss, not a preference: how far a small segmentation network's ink mask and "
        "digit label of the image are from the ground truth (mask BCE + digit "
        "cross-entropy), the digits world's version of Hyper-SD's perceptual loss.",
        None, "0 and up; 0 is a perfect match", False,
        "it needs the ground-truth mask and digit of a real image, so it trains the "
        "feedback stage but cannot score a generated image; the app does not offer it "
        "for scoring.",
        "Train & Monitor (the loss_perceptual term of a feedback stage)"),
    ScoreMeaning(
        "imagereward",
        "human preference for the image given the prompt: ImageReward (Xu et al. 2023), "
        "a BLIP model trained on 137k expert comparisons.",
        None, "unbounded, standardised: about -2 to 2, 0 is the average of its training "
        "images", True,
        "trained on Stable Diffusion-era prompts and images: it favours saturated, "
        "detailed pictures, and reward fine-tuning against it over-saturates. It means "
        "little on the 32 px digits world.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "aesthetic",
        "how pleasing the image looks, ignoring the prompt: the LAION aesthetic "
        "predictor (an MLP on CLIP ViT-L/14 image features).",
        None, "unbounded, roughly 1 to 10 (Hyper-SD reports 5.3 to 5.9 for SD1.5/SDXL)",
        True,
        "it ignores the prompt entirely and prefers some styles (painterly, "
        "high-contrast) whatever was asked for; it is easy to raise by optimising "
        "against it.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "clip-score",
        "how well image and prompt match: 100 x cosine similarity of open_clip ViT-B/32 "
        "image and text embeddings (Hessel et al. 2021), as in Hyper-SD's tables.",
        (0.0, 100.0), "0 to 100; about 30 for good SD1.5 images", True,
        "CLIP reads prompts as a bag of words: it is weak on counts, positions and "
        "which colour belongs to which object, and writing the prompt's words into the "
        "image raises it.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "pickscore",
        "human preference for the image given the prompt: PickScore (Kirstain et al. "
        "2023), a CLIP-H/14 fine-tuned on Pick-a-Pic choices; logit scale x cosine.",
        None, "unbounded, about 18 to 24 (Hyper-SD's tables divide by 100: 0.22)", True,
        "only differences between images of the same prompt mean something; absolute "
        "values vary with the prompt.",
        "Rewards tab, Compare tab (captions and table), Train & Monitor (reward plot)"),
    ScoreMeaning(
        "perception",
        "a loss, not a preference: a frozen instance-segmentation detector's training "
        "loss (Mask R-CNN, or SOLO where mmdet is installed) of the denoised image "
        "against the real image's ground-truth instances (Hyper-SD section 3.2).",
        None, "0 and up; 0 is a perfect match", False,
        "it needs ground-truth instances of a real image, so it trains the feedback "
        "stage but cannot score a generated image; the app does not offer it for "
        "scoring.",
        "Train & Monitor (the loss_perceptual term of a feedback stage)"),
)}

SECONDS = ScoreMeaning(
    "seconds", "wall-clock time of the pipeline call per image on this machine (prompt "
    "encoding, sampling and decoding; a batch's time is shared equally by its images; model "
    "loading and adapter switching excluded).", None, "0 and up", False,
    "it depends on the device and on what else runs on it; compare cells of one grid.",
    "Compare tab (cells table and captions)")


def meaning_markdown(names: list[str] | tuple[str, ...] | None = None,
                     extra: tuple[ScoreMeaning, ...] = ()) -> str:
    """The meanings of ``names`` (default: every reward) as Markdown bullets; names
    without an entry are listed as unexplained rather than left out."""
    names = list(SCORES) if names is None else list(names)
    lines = [SCORES[n].markdown() if n in SCORES else f"- **{n}**: no explanation recorded."
             for n in names]
    return "\n".join(lines + [m.markdown() for m in extra])
