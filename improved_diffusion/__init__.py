"""
improved_diffusion: a reimplementation of OpenAI's improved-diffusion / guided-diffusion
training code (same public API and checkpoint format), with the CLTS timestep schedule
and momentum decay with learning-rate compensation from "Towards Faster Training of
Diffusion Models: An Inspiration of A Consistency Phenomenon".
"""
