"""Conversations: a first question and the follow-ups that continue it, one parent link per
follow-up (table `follow_ups`). A conversation's id is the id of its first job.
"""

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import FollowUp, Job


def link_follow_up(session: Session, job_id: int, parent_job_id: int) -> None:
    """Record that job `job_id` follows up on the answered job `parent_job_id`."""
    session.add(FollowUp(job_id=job_id, parent_job_id=parent_job_id))


def earlier_turns(session: Session, job_id: int) -> list[Job]:
    """The jobs a job continues, oldest first: its parent, the parent's parent, and so on up to
    the conversation's first question. Empty for a first question.

    One recursive query walks the parent links; a parent is always older than its follow-up,
    so ordering by id puts the turns in the order they were asked."""
    chain = (
        select(FollowUp.job_id, FollowUp.parent_job_id)
        .where(FollowUp.job_id == job_id)
        .cte("chain", recursive=True)
    )
    chain = chain.union_all(
        select(FollowUp.job_id, FollowUp.parent_job_id).join(
            chain, FollowUp.job_id == chain.c.parent_job_id
        )
    )
    return list(
        session.scalars(select(Job).join(chain, Job.id == chain.c.parent_job_id).order_by(Job.id))
    )
