"""(stage under construction; see the issue tracker)"""
