"""pykd"""
