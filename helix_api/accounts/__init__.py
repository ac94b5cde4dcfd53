"""Accounts: credentials and the checks every endpoint makes, and usage accounting."""
