"""device_client"""
