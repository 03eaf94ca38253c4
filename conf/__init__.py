"""Conf"""
