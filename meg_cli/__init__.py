"""meg_cli"""
