"""Tests of the registration stores against real databases."""
