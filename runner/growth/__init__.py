"""The growth loop: stages of Tune experiments over variants of a parent."""
