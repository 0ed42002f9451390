"""Zero- and few-shot calls from text prompts.

Prompt sets, text classifiers, slide calls, evidence, evaluation, retrieval and prompt sensitivity.
"""
