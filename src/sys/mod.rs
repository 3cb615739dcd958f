//! The process and its operating system: the descriptor limit and budget
//! ([`fdlimit`]), handing freed heap back ([`memtrim`]) and binding
//! listening sockets with an explicit backlog ([`listener`]). Nothing here
//! knows PostgreSQL.

pub mod fdlimit;
pub mod listener;
pub mod memtrim;
